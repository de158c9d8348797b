"""How much does a run slow down when another process takes a core, per OpenMP wait policy?

With `--threads` equal to the cores, any other load makes torch's OpenMP threads wait for
each other at every parallel region: libgomp spins (GOMP_SPINCOUNT iterations, default
300,000; `OMP_WAIT_POLICY=active` spins forever) before it sleeps, and a thread spinning for a
partner that lost its core burns the core the partner needs. The wait policy decides only
*when* an idle thread sleeps, never what a kernel computes, so every policy must give the
same bits; this script checks that too.

Workload: forward + backward of the LoRA-wrapped tiny preset on the default config's first
`--batches` micro-batches (labels, dropout and all, via `qlorax.loss.summed_token_loss`),
`--reps` times after one warm-up, in a fresh child per measurement whose environment is
exactly the launcher's (`child_environment(os.environ, profile, threads)`) with the policy's
variables applied on top. Each policy is timed alone and beside a *bounded hog*: one process
that keeps one core busy (a Python busy loop) for the whole measurement. Policies run in a
rotating order, `--repeats` times; the slowdown is hogged / alone time of the same repeat,
median over repeats.

    .venv/bin/python bench/bench_wait_policy.py [--threads 2] [--reps 3] [--batches 2] [--repeats 2]

Prints a table, then one JSON line. The policy pinned in `qlorax.profiles` (GOMP_SPINCOUNT)
is recorded in every run's env.json with the other pins.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

POLICIES: dict[str, dict[str, str | None]] = {
    "libgomp default": {"GOMP_SPINCOUNT": None},
    "GOMP_SPINCOUNT=0": {"GOMP_SPINCOUNT": "0"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "GOMP_SPINCOUNT=10000 (pinned)": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=100000": {"GOMP_SPINCOUNT": "100000"},
    "OMP_WAIT_POLICY=passive": {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "passive"},
    "OMP_WAIT_POLICY=active": {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "active"},
}


def child(batches: int, reps: int) -> None:
    """Time `reps` forward+backward passes; print seconds and a digest of the LoRA gradients."""
    import hashlib

    import torch

    from _common import lora_workload
    from qlorax.config import load_config
    from qlorax.data import collate, micro_batch_indices
    from qlorax.determinism import DeterministicConfig
    from qlorax.loss import summed_token_loss, target_tokens

    cfg = load_config(None, {})
    DeterministicConfig.setup_deterministic_environment(cfg.training.seed)
    tokenizer, model, data = lora_workload(cfg)
    model.train()
    train = data.train
    micro = [collate([train[i] for i in micro_batch_indices(len(train), cfg.training.batch_size, 1, k)],
                     tokenizer.pad_token_id) for k in range(batches)]

    def once() -> str:
        torch.manual_seed(5)
        model.zero_grad(set_to_none=True)
        for batch in micro:
            (summed_token_loss(model, batch) / max(target_tokens(batch), 1)).backward()
        digest = hashlib.sha256()
        for _name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                digest.update(param.grad.numpy().tobytes())
        return digest.hexdigest()

    once()
    seconds, digests = [], set()
    for _ in range(reps):
        start = time.perf_counter()
        digests.add(once())
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds, "digests": sorted(digests), "threads": torch.get_num_threads()}))


def measure(policy: dict[str, str | None], hog: bool, args: argparse.Namespace) -> dict[str, Any]:
    from qlorax.determinism import child_environment

    env, _removed = child_environment(os.environ, "strict", args.threads)
    for key, value in policy.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    hog_process = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if hog else None
    try:
        done = subprocess.run([sys.executable, __file__, "--child", "--batches", str(args.batches),
                               "--reps", str(args.reps)], env=env, capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent)
    finally:
        if hog_process is not None:
            hog_process.kill()
            hog_process.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated names from the table")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.batches, args.reps)
        return
    names = [name.strip() for name in args.policies.split(",") if name.strip()]
    os.environ.setdefault("QLORAX_HOME", tempfile.mkdtemp(prefix="qlorax-bench-home-"))
    rows: dict[str, dict[str, list[float]]] = {name: {"alone": [], "hogged": [], "ratio": []} for name in names}
    digests: dict[str, set[str]] = {name: set() for name in names}
    load_before = os.getloadavg()
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            alone = measure(POLICIES[name], False, args)
            hogged = measure(POLICIES[name], True, args)
            a, h = statistics.median(alone["seconds"]), statistics.median(hogged["seconds"])
            rows[name]["alone"].append(a)
            rows[name]["hogged"].append(h)
            rows[name]["ratio"].append(h / a)
            digests[name].update(alone["digests"] + hogged["digests"])
            print(f"  repeat {repeat + 1}: {name:32s} alone {a:7.2f} s  beside a hog {h:7.2f} s", flush=True)
    every = set().union(*digests.values())
    print(f"\nthreads {args.threads}, {args.batches} micro-batches x {args.reps} reps, one busy-loop hog; "
          f"load average before {load_before}, after {os.getloadavg()}")
    print(f"{'policy':34s} {'alone s':>8s} {'hogged s':>9s} {'slowdown':>9s}")
    summary = {}
    for name in names:
        ratio = statistics.median(rows[name]["ratio"])
        summary[name] = {"alone_s": statistics.median(rows[name]["alone"]),
                         "hogged_s": statistics.median(rows[name]["hogged"]), "slowdown": ratio,
                         "per_repeat": rows[name]}
        print(f"{name:34s} {summary[name]['alone_s']:8.2f} {summary[name]['hogged_s']:9.2f} {ratio:8.2f}x")
    print(f"gradient bits: {'identical under every policy' if len(every) == 1 else f'{len(every)} different digests'}")
    print(json.dumps({"threads": args.threads, "policies": summary, "bits_identical": len(every) == 1,
                      "load_before": load_before}, sort_keys=True))


if __name__ == "__main__":
    main()
