"""Benchmark data-parallel training: 2 workers x 1 thread against 1 worker x 2 threads.

    .venv/bin/python bench/bench_workers.py [--steps 20] [--accumulation 4] [--batch-size 2]
        [--repeats 2] [--config C] [--layout 1x2,2x1] [--keep DIR]

Every variant is `qlorax train` through the CLI (the launcher, its pinned children, the gloo
process group), in a temporary QLORAX_HOME with the cache off, on one workload: the config
(default: the default config) with `--accumulation` micro-batches of `--batch-size` per step
(the workers share them out), in-loop eval and checkpoints off. A layout WxT is W workers of T
threads. Per run: tokens/s of the loop (training_metadata.json), the collective share (time
rank 0 spent in the step's all_gather and stop agreement, waiting for the slowest worker
included, over the loop's time), the foreign load, and the adapter digest (every layout must
give the same bits). Ratios are taken within a repeat; the median over repeats is reported.

Communication volume: each step every worker receives the other workers' micro-batch LoRA
gradients (trainable parameters x 4 bytes each; with 2 workers ceil(accumulation / 2) of them),
printed with what that takes on a 1 and a 10 Gbit/s link between two machines. The last line
of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from _common import qlorax_cli
from bench_train import run_logged

TARGET_2X1_OVER_1X2 = 0.9


def overrides(args: argparse.Namespace) -> list[str]:
    pairs = {"training.max_steps": args.steps, "training.warmup_steps": 1, "training.eval_steps": args.steps,
             "training.save_steps": args.steps + 1, "training.batch_size": args.batch_size,
             "training.gradient_accumulation_steps": args.accumulation}
    return [flag for key, value in pairs.items() for flag in ("--set", f"{key}={value}")]


def run_layout(args: argparse.Namespace, root: Path, layout: tuple[int, int], tag: str,
               env: dict[str, str]) -> dict[str, Any]:
    workers, threads = layout
    run_dir = root / "runs" / tag
    cmd = [*qlorax_cli(), "train", "-o", str(run_dir), "--force", "--workers", str(workers), "--threads",
           str(threads), *overrides(args)]
    if args.config:
        cmd += ["--config", str(args.config)]
    wall, foreign = run_logged(cmd, env, root / "logs" / f"{tag}.log")
    meta = json.loads((run_dir / "training_metadata.json").read_text())
    manifest = json.loads((run_dir / "artifact_summary.json").read_text())
    loop = meta["training_duration_seconds"]
    return {"tokens_per_second": meta["tokens_per_second"], "loop_seconds": loop,
            "collective_seconds": meta["collective_seconds"],
            "collective_share": round(meta["collective_seconds"] / loop, 3) if loop else None,
            "adapter_sha256": manifest["files"]["adapter_model.safetensors"]["sha256"],
            "trainable_parameters": json.loads((run_dir / "results.json").read_text())["trainable_parameters"],
            "wall_seconds": round(wall, 1), "foreign_load": foreign}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--layout", default="1x2,2x1", help="WORKERSxTHREADS, comma-separated")
    parser.add_argument("--keep", type=Path, default=None)
    args = parser.parse_args()
    layouts = [tuple(int(n) for n in item.split("x")) for item in args.layout.split(",")]
    names = [f"{w}x{t}" for w, t in layouts]

    root = Path(args.keep or tempfile.mkdtemp(prefix="qlorax-bench-workers-"))
    (root / "logs").mkdir(parents=True, exist_ok=True)
    import os

    env = {**os.environ, "QLORAX_HOME": str(root / "home"), "QLORAX_CACHE": "off",
           "QLORAX_CACHE_DIR": str(root / "cache")}
    run_logged([*qlorax_cli(), "model", "path"], env, root / "logs" / "materialise.log")
    rows: list[dict[str, dict[str, Any]]] = []
    try:
        for repeat in range(args.repeats):
            order = list(zip(names, layouts, strict=True))
            order = order if repeat % 2 == 0 else order[::-1]
            row = {}
            for name, layout in order:
                row[name] = run_layout(args, root, layout, f"r{repeat + 1}-{name}", env)
                result = row[name]
                print(f"repeat {repeat + 1}/{args.repeats} {name:5} {result['tokens_per_second']:8.1f} tok/s  "
                      f"collective {100 * (result['collective_share'] or 0):5.1f} %  "
                      f"(foreign load {result['foreign_load']} cores)", flush=True)
            rows.append(row)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    digests = {run["adapter_sha256"] for row in rows for run in row.values()}
    print(f"\nadapter digests across every layout and repeat: {len(digests)} distinct "
          f"({'same bits' if len(digests) == 1 else 'DIFFERENT BITS'})")
    summary: dict[str, Any] = {"layouts": names, "rows": rows, "same_bits": len(digests) == 1,
                               "args": {k: str(v) for k, v in vars(args).items()}}
    for name in names:
        speeds = [row[name]["tokens_per_second"] for row in rows]
        shares = [row[name]["collective_share"] or 0 for row in rows]
        print(f"{name:5} median {statistics.median(speeds):8.1f} tok/s, collective share median "
              f"{100 * statistics.median(shares):.1f} %")
    if "1x2" in names and "2x1" in names:
        ratios = [row["2x1"]["tokens_per_second"] / row["1x2"]["tokens_per_second"] for row in rows]
        ratio = statistics.median(ratios)
        verdict = "PASS" if ratio >= TARGET_2X1_OVER_1X2 else "FAIL"
        print(f"2 workers x 1 thread / 1 worker x 2 threads: {ratio:.3f} (per repeat "
              f"{', '.join(f'{r:.3f}' for r in ratios)})  target >= {TARGET_2X1_OVER_1X2}: {verdict}")
        summary["ratio_2x1_over_1x2"] = round(ratio, 3)
    params = rows[0][names[0]]["trainable_parameters"]
    # With 2 workers, all_gather sends each worker the other's ceil(accumulation / 2) gradient rows.
    rows_in = math.ceil(args.accumulation / 2)
    received = params * 4 * rows_in
    print(f"per step each of 2 workers receives the other's {rows_in} micro-batch gradients of {params:,} fp32 "
          f"values: {received / 1e6:.2f} MB; between two machines that is ~{received * 8 / 1e9 * 1000:.1f} ms "
          f"at 1 Gbit/s, ~{received * 8 / 1e10 * 1000:.1f} ms at 10 Gbit/s (plus latency)")
    summary["bytes_received_per_worker_per_step"] = received
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
