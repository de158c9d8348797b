"""Memory of local data-parallel workers: one shared copy of the base weights vs one per worker.

    .venv/bin/python bench/bench_memory.py [--config src/qlorax/presets/smollm2-lora.yaml]
        [--workers 2] [--steps 4] [--repeats 2] [--stored-dtype float32|bfloat16]

A base stored as float32 (the presets) is memory-mapped by transformers, so its workers share
it either way; `--stored-dtype bfloat16` trains on a copy of the config's base model with its
weights stored in bfloat16, as most Hub checkpoints are, which every worker converts to its
own float32 copy unless they are shared.

Runs `qlorax train --workers W --threads 1` with the base weights shared (the default since
0.2.3, qlorax.shared_weights) and with `QLORAX_SHARED_WEIGHTS=off` (each worker its own
copy, as before), alternately, `--repeats` times. While each runs it samples, every 0.2 s, the
proportional set size (PSS: a page shared by k processes counts 1/k in each, so the sum over
the workers counts a shared page once; RSS would count it W times) of every worker process
(the CLI's descendants, from /proc/<pid>/smaps_rollup) and keeps the peak of their sum. Prints
a table and, as the last line, one JSON object: peak summed PSS per variant (MB, median),
`shared_over_separate` (target <= 0.6) and whether every run gave one adapter digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import qlorax_cli

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

PRESET = Path(__file__).resolve().parent.parent / "src" / "qlorax" / "presets" / "smollm2-lora.yaml"
TARGET = 0.6


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the launcher's workers and anything they start)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def bfloat16_copy(config: Path, target: Path) -> Path:
    """The config's base model with its safetensors weights stored in bfloat16."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from qlorax.config import load_config
    from qlorax.model import resolve_base_model

    shutil.copytree(resolve_base_model(load_config(config).model).local_dir, target)
    for path in target.glob("*.safetensors"):
        tensors = load_file(path)
        save_file({name: t.to(torch.bfloat16) for name, t in tensors.items()}, str(path), metadata={"format": "pt"})
    return target


def training_phase(log: Path) -> tuple[float, float]:
    """When the run's training phase began and ended (epoch seconds, from train.log)."""
    from datetime import datetime

    def at(line: str) -> float:
        return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()

    lines = log.read_text().splitlines()
    begin = next(at(line) for line in lines if " phase training:" in line)
    end = next(at(line) for line in lines if " phase training done" in line)
    return begin, end


def run(config: Path, workers: int, steps: int, shared: bool, out: Path, model: Path | None = None
        ) -> dict[str, float | str]:
    env = {**os.environ, "QLORAX_SHARED_WEIGHTS": "on" if shared else "off", "QLORAX_CACHE": "off"}
    command = [*qlorax_cli(), "train", "-c", str(config), "-o", str(out), "--force", "--workers", str(workers),
               "--threads", "1", "--set", f"training.max_steps={steps}", "--set", f"training.eval_steps={steps}",
               "--set", f"training.save_steps={steps + 1}", "--set", "training.sample_max_new_tokens=2",
               # one step = W micro-batches of 1 sequence (bench_real.py's data-parallel layout)
               "--set", "training.batch_size=1", "--set", f"training.gradient_accumulation_steps={workers}",
               *(("--set", f"model.name_or_path={model}") if model is not None else ())]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    samples, start = [], time.perf_counter()
    while process.poll() is None:
        samples.append((time.time(), sum(pss_kib(pid) for pid in descendants(process.pid))))
        time.sleep(0.2)
    peak_kib = max((kib for _, kib in samples), default=0)
    _, stderr = process.communicate()
    if process.returncode != 0 or peak_kib == 0:
        raise SystemExit(f"qlorax train failed (exit {process.returncode}):\n{stderr[-3000:]}")
    digest = hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
    # while training: the samples between train.log's "phase training" and its "done" line
    begin, end = training_phase(out / "train.log")
    steady_kib = statistics.median([kib for at, kib in samples if begin <= at <= end] or [0])
    return {"peak_pss_mb": round(peak_kib / 1024, 1), "steady_pss_mb": round(steady_kib / 1024, 1),
            "seconds": round(time.perf_counter() - start, 1),
            "adapter_sha256": digest}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=PRESET)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stored-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    args = parser.parse_args()
    rows: dict[str, list[dict[str, float | str]]] = {"shared": [], "separate": []}
    with tempfile.TemporaryDirectory(prefix="qlorax-bench-memory-") as scratch:
        model = bfloat16_copy(args.config, Path(scratch) / "base-bf16") if args.stored_dtype == "bfloat16" else None
        for repeat in range(args.repeats):
            order = ("shared", "separate") if repeat % 2 == 0 else ("separate", "shared")
            for variant in order:
                result = run(args.config, args.workers, args.steps, variant == "shared",
                             Path(scratch) / f"{variant}-{repeat}", model)
                rows[variant].append(result)
                adapter = str(result["adapter_sha256"])[:12]
                print(f"{variant:9s} repeat {repeat + 1}: peak PSS of the {args.workers} workers "
                      f"{result['peak_pss_mb']} MB (while training: {result['steady_pss_mb']} MB), "
                      f"{result['seconds']} s, adapter {adapter}", flush=True)
    medians = {variant: statistics.median(float(r["peak_pss_mb"]) for r in runs) for variant, runs in rows.items()}
    steady = {variant: statistics.median(float(r["steady_pss_mb"]) for r in runs) for variant, runs in rows.items()}
    ratio = medians["shared"] / medians["separate"]
    steady_ratio = steady["shared"] / steady["separate"]
    digests = {r["adapter_sha256"] for runs in rows.values() for r in runs}
    print(f"base stored as {args.stored_dtype}; peak PSS summed over {args.workers} workers (median): "
          f"shared {medians['shared']:.0f} MB, separate "
          f"{medians['separate']:.0f} MB, ratio {ratio:.3f} (target <= {TARGET}); while training: shared "
          f"{steady['shared']:.0f} MB, separate {steady['separate']:.0f} MB, ratio {steady_ratio:.3f}; "
          f"one adapter digest: {len(digests) == 1}")
    print(json.dumps({"config": str(args.config), "stored_dtype": args.stored_dtype, "workers": args.workers,
                      "steps": args.steps,
                      "pss_mb": medians, "shared_over_separate": round(ratio, 3), "steady_pss_mb": steady,
                      "steady_shared_over_separate": round(steady_ratio, 3), "target": TARGET,
                      "digests_identical": len(digests) == 1, "runs": rows}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
