"""qlorax against what a user with the same cores would run instead: HF Trainer + PEFT under DDP.

    QLORAX_HOME=... .venv/bin/python bench/bench_peer.py [--repeats 3] [--steps 8]
        [--batch-size 2] [--max-length 160] [--config src/qlorax/presets/smollm2-lora.yaml]

One workload (bench_real.py's: the SmolLM2 LoRA preset, `--steps` steps of `--batch-size`
sequences of at most `--max-length` tokens, in-loop eval and checkpoints off), four layouts on
2 cores, run alternately in every repeat:

  ours-dp    `qlorax train --workers 2 --threads 1` (each step: 2 micro-batches of 1 sequence,
             one per worker); loop tokens/s from training_metadata.json, adapter digest.
  hf-ddp     HF Trainer + PEFT under `torchrun --nproc_per_node 2` (DDP over gloo, 1 thread
             each, `full_determinism`), the same model, LoRA init, schedule and stream of
             batches (rank r gets micro-batches r, r+2, ...: the ones our worker r owns);
             tokens/s = both ranks' tokens / the slower rank's loop time.
  ours-1p    our loop in one process at 2 threads (bench_real.py's `ours` child: its 2
             micro-batches a step side by side, one thread each, qlorax.micro_batches), which
             also gives the workload's useful FLOPs.
  hf-1p      HF Trainer in one process at 2 threads.

Every layout runs with the launcher's strict pins (`child_environment`). While each runs, the
proportional set size (PSS) of all its processes is sampled every 0.2 s (peak of the sum).
Also one fp32 matmul peak at 2 threads (bench_real.py's `peak` child). Prints a table and, as
its last line, one JSON object with `ours_over_hf_ddp` (median of the per-repeat ratios),
`ours_over_hf_single`, `share_of_matmul_peak` (ours-dp's useful FLOP/s over the peak),
`ours_digests_identical` (every qlorax run of every layout gave one adapter digest) and
`pss_mb` per layout. Targets (issue 24): 1.3, 1.3, 0.60.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from bench_memory import descendants, pss_kib  # noqa: E402
from bench_real import PRESET, cli_train, load_workload, run_child  # noqa: E402

TARGETS = {"ours_over_hf_ddp": 1.3, "ours_over_hf_single": 1.3, "share_of_matmul_peak": 0.60}


class PssSampler:
    """The peak, over the run, of the summed PSS of every process below this one."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, sum(pss_kib(pid) for pid in descendants(os.getpid())))
            time.sleep(0.2)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def hf_ddp(args: argparse.Namespace, root: Path, tag: str) -> dict[str, Any]:
    """HF Trainer under torchrun, 2 ranks x 1 thread, each writing its own result."""
    from qlorax.determinism import child_environment

    env, _ = child_environment(os.environ, "strict", 1)
    env = {**env, "GLOO_SOCKET_IFNAME": "lo"}
    results = root / "runs" / tag
    results.mkdir(parents=True, exist_ok=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), str(Path(__file__).resolve()), "--ddp-child", "--result-dir", str(results),
               "--config", str(args.config), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{tag}: torchrun failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    ranks = [json.loads((results / f"rank-{rank}.json").read_text()) for rank in range(2)]
    seconds = max(rank["train_seconds"] for rank in ranks)
    tokens = sum(rank["tokens"] for rank in ranks)
    print(f"  {tag:14s} done in {time.perf_counter() - start:6.1f} s", flush=True)
    return {"tokens_per_second": round(tokens / seconds, 1), "train_seconds": seconds, "tokens": tokens,
            "steps": ranks[0]["steps"]}


def ddp_child(args: argparse.Namespace) -> None:
    """One torchrun rank: the matched HF Trainer on this rank's share of the stream."""
    import warnings

    warnings.filterwarnings("ignore")
    from _common import run_matched_hf_trainer

    rank = int(os.environ["RANK"])
    args.workers = 2
    cfg = load_workload(args)
    result = run_matched_hf_trainer(cfg, cfg.training.max_steps, args.result_dir / f"out-{rank}", world_size=2)
    (args.result_dir / f"rank-{rank}.json").write_text(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=PRESET)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_child:
        ddp_child(args)
        return 0
    # what bench_real's helpers read from its own arguments
    args.profile, args.matmul_size, args.lever_reps, args.workers, args.threads = "strict", 2048, 1, 2, 2
    rows: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="qlorax-bench-peer-") as scratch:
        root = Path(scratch)
        for folder in ("logs", "runs"):
            (root / folder).mkdir()
        env = {**os.environ, "QLORAX_CACHE": "off"}
        peak = run_child("peak", args, root, "peak", 2, env)
        layouts = ["ours-dp", "hf-ddp", "ours-1p", "hf-1p"]
        for repeat in range(args.repeats):
            row: dict[str, dict[str, Any]] = {}
            for layout in layouts[repeat % 4:] + layouts[:repeat % 4]:
                tag = f"{layout}-{repeat + 1}"
                with PssSampler() as sampler:
                    if layout == "ours-dp":
                        result = cli_train(args, root, env, tag, workers=2)
                    elif layout == "hf-ddp":
                        result = hf_ddp(args, root, tag)
                    else:
                        result = run_child("ours" if layout == "ours-1p" else "hf", args, root, tag, 2, env)
                result["pss_mb"] = round(sampler.peak_kib / 1024, 1)
                row[layout] = result
            rows.append(row)
            print(f"repeat {repeat + 1}: " + ", ".join(f"{name} {row[name]['tokens_per_second']:.1f} tok/s "
                                                       f"(PSS {row[name]['pss_mb']:.0f} MB)" for name in layouts),
                  flush=True)
    ddp = [row["ours-dp"]["tokens_per_second"] / row["hf-ddp"]["tokens_per_second"] for row in rows]
    single = [row["ours-1p"]["tokens_per_second"] / row["hf-1p"]["tokens_per_second"] for row in rows]
    flops = statistics.median(row["ours-1p"]["useful_flops"] for row in rows)
    achieved = [flops / row["ours-dp"]["train_seconds"] / 1e9 for row in rows]
    share = statistics.median(achieved) / peak["gflops_best"]
    digests = {row["ours-dp"]["adapter_sha256"] for row in rows}
    summary = {
        "ours_over_hf_ddp": round(statistics.median(ddp), 3), "ours_over_hf_ddp_per_repeat": [round(r, 3) for r in ddp],
        "ours_over_hf_single": round(statistics.median(single), 3),
        "ours_over_hf_single_per_repeat": [round(r, 3) for r in single],
        "share_of_matmul_peak": round(share, 3), "matmul_peak_gflops": peak["gflops_best"],
        "ours_digests_identical": len(digests) == 1,
        "pss_mb": {name: statistics.median(row[name]["pss_mb"] for row in rows) for name in layouts},
        "tokens_per_second": {name: [row[name]["tokens_per_second"] for row in rows] for name in layouts},
        "targets": TARGETS, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
    }
    print(f"ours/HF DDP (2 x 1 thread): {summary['ours_over_hf_ddp']} (per repeat {ddp}); target >= 1.3")
    print(f"ours/HF in one process (2 threads): {summary['ours_over_hf_single']}; target >= 1.3")
    print(f"share of the 2-thread matmul peak ({peak['gflops_best']} GFLOP/s): {share:.1%}; target >= 60 %")
    print(f"one adapter digest over every data-parallel run: {summary['ours_digests_identical']}")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
