"""Benchmark `qlorax verify`: N runs on C cores should take about ceil(N/C) single-run times, not N.

Times one `qlorax train --threads 1` run, then `qlorax verify --runs N --threads 1 --jobs C`
(N=4 by default, C = the cores this process may use), both via the CLI with the same
config (tests/fixtures/tiny.yaml by default; `--steps` overrides training.max_steps) and a
temporary QLORAX_HOME in which the preset is materialised beforehand (not timed). Prints
both wall times, the ratio verify/single and the ideal ceil(N/C) to compare it with, and
splits verify's wall time into the runs phase (until the last run wrote its metadata) and
the rest (analysis and reports).

    .venv/bin/python bench/bench_verify.py [--runs 4] [--jobs C] [--config tests/fixtures/tiny.yaml]
        [--steps S] [--repeats 1] [--verify-threads 1] [--keep DIR]

With --repeats R the single run and verify alternate R times and medians are reported.
`--verify-threads 1,2` times what `make demo` does (runs alternate 1 and 2 threads), which
with C jobs can put more threads than cores on the machine. Each timing also reports the
foreign load: the cores the rest of the machine used meanwhile (from /proc/stat minus our
own processes' CPU time); numbers taken with a foreign load near a core are not the tool's.
The last line of output is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import children_cpu_seconds, machine_busy_seconds, qlorax_cli

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict[str, str], log: Path, ok_codes: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Run with output into `log`; fails loudly on other exit codes. Returns the start (epoch
    seconds), wall seconds, exit code, and the foreign load: the cores the rest of the machine
    used meanwhile (machine busy time minus our subprocess tree's CPU time, over the wall time)."""
    busy, own = machine_busy_seconds(), children_cpu_seconds()
    epoch, start = time.time(), time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        code = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - start
    busy_after, own_after = machine_busy_seconds(), children_cpu_seconds()
    if code not in ok_codes:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise SystemExit(f"command failed with exit code {code}: {' '.join(cmd)}\n{tail}")
    foreign = None
    if busy is not None and busy_after is not None and wall > 0:
        foreign = round(max(0.0, (busy_after - busy) - (own_after - own)) / wall, 2)
    return {"epoch": epoch, "wall": wall, "code": code, "foreign_load": foreign}


def _utc_epoch(stamp: str) -> float:
    """Seconds since the epoch of a `training_metadata.json` UTC timestamp."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def default_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=None, help="concurrent runs (default: the cores, C)")
    parser.add_argument("--config", type=Path, default=REPO / "tests" / "fixtures" / "tiny.yaml")
    parser.add_argument("--steps", type=int, default=None, help="override training.max_steps")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--verify-threads", default="1",
                        help="verify's --threads list (default 1; `make demo` uses 1,2, which with C jobs can put "
                             "more threads than cores on the machine)")
    parser.add_argument("--keep", type=Path, default=None, help="work here (runs, logs) and keep it")
    args = parser.parse_args()

    cores = default_cores()
    jobs = args.jobs or cores
    ideal = math.ceil(args.runs / jobs)
    overrides = ["--set", f"training.max_steps={args.steps}"] if args.steps else []
    common = ["--config", str(args.config.resolve()), *overrides]
    keep = args.keep.resolve() if args.keep else None
    root = keep or Path(tempfile.mkdtemp(prefix="qlorax-bench-verify-"))
    (root / "logs").mkdir(parents=True, exist_ok=True)
    # A private home and run cache, and the cache off: every run must really train (a cache hit
    # would restore an earlier run's tokens/s) and nothing may land in the user's cache.
    env = {**os.environ, "QLORAX_HOME": str(root / "home"), "QLORAX_CACHE": "off",
           "QLORAX_CACHE_DIR": str(root / "cache")}
    cli = qlorax_cli()
    load_before = os.getloadavg()
    singles: list[dict[str, Any]] = []
    verifies: list[dict[str, Any]] = []
    try:
        timed([*cli, "model", "path"], env, root / "logs" / "materialise.log")
        for repeat in range(1, args.repeats + 1):
            run_dir = root / f"single-{repeat}"
            done = timed([*cli, "train", *common, "-o", str(run_dir), "--force", "--threads", "1"], env,
                         root / "logs" / f"single-{repeat}.log")
            meta = json.loads((run_dir / "training_metadata.json").read_text())
            singles.append({"wall_seconds": round(done["wall"], 2), "in_process_seconds": meta["duration_seconds"],
                            "foreign_load": done["foreign_load"]})
            print(f"repeat {repeat}: single train --threads 1: {done['wall']:.1f} s "
                  f"(foreign load {done['foreign_load']} cores)", flush=True)

            out = root / f"verify-{repeat}"
            verify_cmd = [*cli, "verify", *common, "--runs", str(args.runs), "--threads", args.verify_threads,
                          "--jobs", str(jobs), "-o", str(out), "--force"]
            done = timed(verify_cmd, env, root / "logs" / f"verify-{repeat}.log", ok_codes=(0, 1))
            epoch, wall, code = done["epoch"], done["wall"], done["code"]
            metas = [json.loads(path.read_text()) for path in sorted(out.glob("run-*/training_metadata.json"))]
            runs_done = max(_utc_epoch(m["finished_at"]) for m in metas) - epoch if metas else float("nan")
            verifies.append({"wall_seconds": round(wall, 2), "exit_code": code, "runs_completed": len(metas),
                             "runs_phase_seconds": round(runs_done, 2),
                             "after_runs_seconds": round(wall - runs_done, 2),
                             "run_in_process_seconds": [m["duration_seconds"] for m in metas],
                             "foreign_load": done["foreign_load"]})
            print(f"repeat {repeat}: verify --runs {args.runs} --threads {args.verify_threads} --jobs {jobs}: "
                  f"{wall:.1f} s (exit {code}; runs done at {runs_done:.1f} s; foreign load "
                  f"{done['foreign_load']} cores)", flush=True)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()

    single = statistics.median(s["wall_seconds"] for s in singles)
    verify = statistics.median(v["wall_seconds"] for v in verifies)
    ratios = [v["wall_seconds"] / s["wall_seconds"] for s, v in zip(singles, verifies, strict=True)]
    ratio = statistics.median(ratios)
    runs_phase = statistics.median(v["runs_phase_seconds"] for v in verifies)
    after = statistics.median(v["after_runs_seconds"] for v in verifies)
    single_in = statistics.median(s["in_process_seconds"] for s in singles)
    parallel_in = statistics.median(x for v in verifies for x in v["run_in_process_seconds"])
    print()
    print(f"config {args.config}{' with training.max_steps=' + str(args.steps) if args.steps else ''}; "
          f"N={args.runs} runs, C={jobs} jobs, verify --threads {args.verify_threads}, {cores} cores available")
    print(f"single run (train --threads 1)     {single:7.1f} s wall ({single_in:.1f} s in the training process)")
    print(f"verify (N runs, C jobs)            {verify:7.1f} s wall (runs phase {runs_phase:.1f} s, "
          f"analysis+report {after:.1f} s)")
    print(f"one run inside verify              {parallel_in:7.1f} s in the training process "
          f"(x{parallel_in / single_in:.2f} of alone)")
    print(f"ratio verify/single                {ratio:7.2f}   ideal ceil(N/C) = {ideal}, serial would be {args.runs}")
    print(f"ratio runs-phase/single            {runs_phase / single:7.2f}")
    print(f"foreign load (cores the rest of the machine used): single {[s['foreign_load'] for s in singles]}, "
          f"verify {[v['foreign_load'] for v in verifies]}")
    print(f"load average before {[round(x, 2) for x in load_before]}, after {[round(x, 2) for x in load_after]} "
          f"on {os.cpu_count()} CPUs")
    print(json.dumps({
        "config": str(args.config), "steps_override": args.steps, "runs": args.runs, "jobs": jobs, "cores": cores,
        "verify_threads": args.verify_threads,
        "repeats": args.repeats, "single_wall_seconds": singles, "verify": verifies,
        "single_wall_seconds_median": single, "verify_wall_seconds_median": verify,
        "ratio_verify_over_single": round(ratio, 3), "ratio_per_repeat": [round(r, 3) for r in ratios],
        "ratio_runs_phase_over_single": round(runs_phase / single, 3), "ideal_ratio": ideal,
        "serial_ratio": args.runs, "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }, sort_keys=True))


if __name__ == "__main__":
    main()
