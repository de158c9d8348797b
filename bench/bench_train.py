"""Benchmark the training loop: our loop vs HF Trainer + PEFT, strict vs off, one end-to-end run.

One workload for every variant: the tiny preset model, the bundled default data tokenized
by qlorax.data, the default QloraxConfig's batch size, learning rate, warmup, seed and LoRA
settings, `--steps` optimizer steps (default 30), `--threads` threads (default 2).

  ours  `qlorax train --profile P --threads T` in a subprocess: the real run_training.
        tokens/s = its training_metadata.json `tokens_per_second` (non-pad input tokens of
        the steps / wall time of the loop; model load excluded). In-loop eval and
        checkpoints are switched off (eval_steps=steps, save_steps=steps+1) because the HF
        side does neither; the loop still writes its trace, log and LoRA digests.
  hf    HF Trainer + PEFT (`TrainingArguments(full_determinism=True, use_cpu=True)`), in a
        child of this script with the environment qlorax.determinism.child_environment()
        gives profile P. Same model, LoRA wrap, batch size, lr, warmup, max_steps, seed;
        no eval, no saving, logging off. Its dataset is our examples in exactly the order
        our loop draws them (micro_batch_indices) with a sequential sampler, collated by
        qlorax.data.collate, so both sides process the same batches and the same tokens.
        tokens/s = non-pad input tokens / time from on_train_begin to on_train_end.

Variants ours/hf x strict/off run in fresh processes, `--repeats` times (default 3) in a
rotating order; ratios are taken within each repeat (so drift in machine load cancels)
and the median is reported. Targets: ours/hf >= 1.0 (same profile), strict/off >= 0.95.
Each run also records the foreign load: the cores the rest of the machine used while it
ran (/proc/stat busy time minus our subprocess tree's CPU time, over the wall time). With
2 threads on a 2-core machine, any foreign load makes torch's OpenMP threads wait on each
other and a run can be 10-30x slower, so runs above `--busy-limit` cores (default 0.2) are
marked, and the ratios are also given over the quiet repeats only (used for PASS/FAIL
when there is at least one).
Finally one default `qlorax train` (all defaults, default threads) is timed end to end
(wall clock of the CLI; the preset is materialised beforehand). Target: < 60 s.

    .venv/bin/python bench/bench_train.py [--steps 30] [--threads 2] [--repeats 3]
        [--profiles strict,off|strict,portable] [--skip-e2e] [--busy-limit 0.2] [--keep DIR]

The last line of output is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import children_cpu_seconds, machine_busy_seconds, qlorax_cli, run_matched_hf_trainer
from qlorax.layout import METADATA, RESULTS

TARGET_OURS_OVER_HF = 1.0
TARGET_STRICT_OVER_OFF = 0.95
TARGET_E2E_SECONDS = 60.0


# --------------------------------------------------------------------------- helpers


def run_logged(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float | None]:
    """Run a command with output into `log`; raises with the log tail on failure.

    Returns (wall seconds, foreign load): the CPU the rest of the machine used meanwhile, in
    cores (machine busy time minus our subprocess tree's CPU time, over the wall time)."""
    busy, own, start = machine_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        code = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - start
    busy_after, own_after = machine_busy_seconds(), children_cpu_seconds()
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise SystemExit(f"command failed with exit code {code}: {' '.join(cmd)}\n{tail}")
    if busy is None or busy_after is None or wall <= 0:
        return wall, None
    return wall, round(max(0.0, (busy_after - busy) - (own_after - own)) / wall, 2)


def workload(steps: int) -> Any:
    """The default config with `steps` steps (warmup clipped to fit)."""
    from qlorax.config import QloraxConfig

    cfg = QloraxConfig()
    cfg.training.warmup_steps = min(cfg.training.warmup_steps, steps)
    cfg.training.max_steps = steps
    return cfg


def workload_overrides(steps: int) -> list[str]:
    """`--set` flags for `qlorax train`: the workload, with in-loop eval and checkpoints off."""
    cfg = workload(steps)
    return ["--set", f"training.max_steps={steps}", "--set", f"training.warmup_steps={cfg.training.warmup_steps}",
            "--set", f"training.eval_steps={steps}", "--set", f"training.save_steps={steps + 1}"]


def utc_epoch(stamp: str) -> float:
    """Seconds since the epoch of a `training_metadata.json` UTC timestamp."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def materialise_preset(env: dict[str, str], log: Path) -> None:
    run_logged([*qlorax_cli(), "model", "path"], env, log)


# --------------------------------------------------------------------------- variants (parent side)


def run_ours(root: Path, tag: str, profile: str, threads: int, steps: int, env: dict[str, str]) -> dict[str, Any]:
    """The real loop: `qlorax train` in a subprocess; numbers from the run directory."""
    run_dir = root / "runs" / tag
    cmd = [*qlorax_cli(), "train", "-o", str(run_dir), "--force", "--profile", profile, "--threads", str(threads),
           *workload_overrides(steps)]
    launched = time.time()
    wall, foreign = run_logged(cmd, env, root / "logs" / f"{tag}.log")
    meta = json.loads((run_dir / METADATA).read_text())
    if utc_epoch(meta["started_at"]) < launched:  # e.g. a run restored from a cache
        raise SystemExit(f"{run_dir}: training_metadata.json predates this run; it did not train")
    results = json.loads((run_dir / RESULTS).read_text())
    return {"tokens_per_second": meta["tokens_per_second"], "train_seconds": meta["training_duration_seconds"],
            "tokens": results["train_tokens"], "final_loss": results["final_train_loss"], "wall_seconds": wall,
            "foreign_load": foreign}


def run_hf(root: Path, tag: str, profile: str, threads: int, steps: int, env: dict[str, str]) -> dict[str, Any]:
    """HF Trainer in a child of this script, with the pinned environment of `profile`."""
    from qlorax.determinism import child_environment

    child_env, _ = child_environment(env, profile, threads)
    out = root / "runs" / f"{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "hf", "--steps", str(steps),
           "--threads", str(threads), "--result", str(out), "--workdir", str(root / "runs" / tag)]
    wall, foreign = run_logged(cmd, child_env, root / "logs" / f"{tag}.log")
    result = json.loads(out.read_text())
    if result["torch_threads"] != threads:
        raise SystemExit(f"{tag}: HF Trainer ran on {result['torch_threads']} threads, not {threads}")
    result["wall_seconds"] = wall
    result["foreign_load"] = foreign
    return result


# --------------------------------------------------------------------------- HF Trainer (child side)


def child_hf(steps: int, threads: int, result: Path, workdir: Path) -> None:
    """Train the same workload with HF Trainer + PEFT and write tokens/s to `result`."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    outcome = run_matched_hf_trainer(workload(steps), steps, workdir)
    result.write_text(json.dumps({**outcome, "mkl_cbwr": os.environ.get("MKL_CBWR")}))


# --------------------------------------------------------------------------- main


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def is_busy(run: dict[str, Any], limit: float) -> bool:
    """Did the rest of the machine use more than `limit` cores while this run ran?"""
    return run.get("foreign_load") is not None and run["foreign_load"] > limit


def paired(rows: list[dict[str, dict[str, Any]]], top: str, bottom: str, busy_limit: float | None = None
           ) -> list[float]:
    """Per-repeat ratios top/bottom of tokens/s (both measured in the same repeat); with
    `busy_limit`, only the repeats in which neither run shared the machine."""
    return [row[top]["tokens_per_second"] / row[bottom]["tokens_per_second"]
            for row in rows if top in row and bottom in row
            and (busy_limit is None or not (is_busy(row[top], busy_limit) or is_busy(row[bottom], busy_limit)))]


def report(args: argparse.Namespace, names: list[str], profiles: list[str], rows: list[dict[str, dict[str, Any]]],
           e2e: dict[str, Any] | None, loads: tuple[Any, Any]) -> None:
    """The table, the ratios against their targets, and one line of JSON."""
    limit = args.busy_limit
    summary: dict[str, Any] = {"steps": args.steps, "threads": args.threads, "repeats": args.repeats,
                               "cpus": os.cpu_count(), "busy_limit_cores": limit,
                               "loadavg_before": [round(x, 2) for x in loads[0]],
                               "loadavg_after": [round(x, 2) for x in loads[1]], "variants": {}, "ratios": {}}
    print()
    print(f"{'variant':12s} {'median tok/s':>12s}  {'per repeat tok/s (foreign load, cores)':44s} {'tokens':>6s}")
    for name in names:
        runs = [row[name] for row in rows]
        rates = [run["tokens_per_second"] for run in runs]
        tokens = sorted({run["tokens"] for run in runs})
        summary["variants"][name] = {
            "tokens_per_second_median": round(median(rates), 1), "tokens_per_second": rates, "tokens": tokens,
            "train_seconds": [run["train_seconds"] for run in runs],
            "foreign_load": [run["foreign_load"] for run in runs]}
        shown = ", ".join(f"{run['tokens_per_second']:.0f} ({run['foreign_load']}){'*' if is_busy(run, limit) else ''}"
                          for run in runs)
        print(f"{name:12s} {median(rates):12.1f}  {shown:44s} {'/'.join(map(str, tokens)):>6s}")
    hf_env = "; ".join(f"hf-{p}: under our '{p}' pins" for p in profiles)
    print(f"hf = HF Trainer + PEFT, full_determinism=True ({hf_env}).")
    print(f"* = the rest of the machine used more than {limit} cores during the run (its speed is not the loop's)")
    print()

    pairs = [(f"ours/hf ({p})", f"ours-{p}", f"hf-{p}", TARGET_OURS_OVER_HF) for p in profiles]
    if "strict" in profiles and "off" in profiles:
        pairs += [("ours strict/off", "ours-strict", "ours-off", TARGET_STRICT_OVER_OFF),
                  ("hf strict/off", "hf-strict", "hf-off", None)]
    if "strict" in profiles and "portable" in profiles:  # the price of exact math (docs/determinism.md)
        pairs += [("ours portable/strict", "ours-portable", "ours-strict", None)]
    for label, top, bottom, target in pairs:
        values, quiet = paired(rows, top, bottom), paired(rows, top, bottom, limit)
        judged = quiet or values
        verdict = "(info)" if target is None else (
            f"target >= {target}: {'PASS' if median(judged) >= target else 'FAIL'}"
            + ("" if quiet else " (no quiet repeat: unreliable)"))
        summary["ratios"][label] = {"per_repeat": [round(v, 3) for v in values], "median": round(median(values), 3),
                                    "quiet_repeats": [round(v, 3) for v in quiet],
                                    "quiet_median": round(median(quiet), 3) if quiet else None, "target": target}
        quiet_text = f"quiet repeats {median(quiet):.3f} (n={len(quiet)})" if quiet else "no quiet repeat"
        print(f"{label:16s} median {median(values):7.3f} (per repeat {', '.join(f'{v:.3f}' for v in values)}); "
              f"{quiet_text}  {verdict}")
    if e2e is not None:
        ok = e2e["wall_seconds"] < TARGET_E2E_SECONDS
        print(f"{'default train':16s} end to end {e2e['wall_seconds']:.1f} s (training process "
              f"{e2e['in_process_seconds']:.1f} s, loop {e2e['train_seconds']:.1f} s at {e2e['tokens_per_second']} "
              f"tok/s; foreign load {e2e['foreign_load']} cores)  target < {TARGET_E2E_SECONDS:.0f} s: "
              f"{'PASS' if ok else 'FAIL'}")
        summary["e2e_default_train"] = {**e2e, "target_seconds": TARGET_E2E_SECONDS}
    token_sets = {name: summary["variants"][name]["tokens"] for name in names}
    if len({tuple(t) for t in token_sets.values()}) != 1:
        print(f"warning: the variants processed different token counts: {token_sets}")
    print(f"load average before {summary['loadavg_before']}, after {summary['loadavg_after']} on "
          f"{os.cpu_count()} CPUs")
    print(json.dumps(summary, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profiles", default="strict,off", help="profiles to run ours and hf under")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end default `qlorax train`")
    parser.add_argument("--busy-limit", type=float, default=0.2,
                        help="a run during which the rest of the machine used more cores than this is marked busy")
    parser.add_argument("--keep", type=Path, default=None, help="work here (runs, logs) and keep it")
    parser.add_argument("--child", choices=["hf"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "hf":
        child_hf(args.steps, args.threads, args.result, args.workdir)
        return

    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    variants = [(side, profile) for profile in profiles for side in ("ours", "hf")]
    keep = args.keep.resolve() if args.keep else None
    root = keep or Path(tempfile.mkdtemp(prefix="qlorax-bench-train-"))
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    # A private home and run cache, and the cache off: every run must really train (a cache hit
    # would restore an earlier run's tokens/s) and nothing may land in the user's cache.
    env = {**os.environ, "QLORAX_HOME": str(root / "home"), "QLORAX_CACHE": "off",
           "QLORAX_CACHE_DIR": str(root / "cache")}
    load_before = os.getloadavg()
    try:
        materialise_preset(env, root / "logs" / "materialise.log")
        rows: list[dict[str, dict[str, Any]]] = []
        for repeat in range(args.repeats):
            row: dict[str, dict[str, Any]] = {}
            shift = repeat % len(variants)
            for side, profile in variants[shift:] + variants[:shift]:
                name = f"{side}-{profile}"
                runner = run_ours if side == "ours" else run_hf
                run = row[name] = runner(root, f"{name}-{repeat + 1}", profile, args.threads, args.steps, env)
                print(f"repeat {repeat + 1}/{args.repeats} {name:12s} {run['tokens_per_second']:8.1f} tok/s "
                      f"({run['tokens']} tokens in {run['train_seconds']:.1f} s; foreign load "
                      f"{run['foreign_load']} cores)", flush=True)
            rows.append(row)

        e2e: dict[str, Any] | None = None
        if not args.skip_e2e:
            run_dir = root / "runs" / "e2e-default"
            wall, foreign = run_logged([*qlorax_cli(), "train", "-o", str(run_dir), "--force"], env,
                                       root / "logs" / "e2e-default.log")
            meta = json.loads((run_dir / METADATA).read_text())
            e2e = {"wall_seconds": round(wall, 2), "foreign_load": foreign,
                   "in_process_seconds": meta["duration_seconds"], "train_seconds": meta["training_duration_seconds"],
                   "tokens_per_second": meta["tokens_per_second"]}
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    report(args, [f"{side}-{profile}" for side, profile in variants], profiles, rows, e2e,
           (load_before, os.getloadavg()))


if __name__ == "__main__":
    main()
