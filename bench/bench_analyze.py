"""Benchmark `analyze_runs` over 100 synthetic run directories (target: under 10 s).

Each run has a real ~2 MB safetensors adapter (8 layers, hidden 1024, rank 16) and every
other run file; 90 runs are identical, the rest differ the ways real runs do (ULP-level
adapter changes, a diverging trace, a tampered file, an unfinished run), so the timing
includes tensor comparisons and trace divergence, not only hashing.

    .venv/bin/python bench/bench_analyze.py [--runs 100] [--layers 8] [--keep DIR]

Note: the files were just written, so they are hashed from the page cache.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from qlorax.analysis import analyze_runs, discover_runs, write_reports  # noqa: E402
from synthetic_runs import make_run  # noqa: E402


def build(root: Path, runs: int, layers: int) -> None:
    """Write the run directories: mostly identical, a few of each kind of difference."""
    shape = {"layers": layers, "hidden": 1024, "rank": 16, "steps": 60, "trace_every": 10}
    for i in range(runs):
        knobs: dict = {}
        kind = i % 20
        if kind == 5:
            knobs = {"perturb_ulps": 1}
        elif kind == 11:
            knobs = {"diverge_at": 37}
        elif i == runs - 2:
            knobs = {"tamper": "adapter_model.safetensors"}
        elif i == runs - 1:
            knobs = {"manifest": False}
        make_run(root, f"run-{i:03d}", threads=1 + i % 4, **shape, **knobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--keep", type=Path, default=None, help="build here and keep the runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qlorax-bench-") as tmp:
        root = args.keep or Path(tmp) / "runs"
        start = time.perf_counter()
        build(root, args.runs, args.layers)
        built = time.perf_counter() - start
        adapter_mb = (root / "run-000" / "adapter_model.safetensors").stat().st_size / 2**20
        total_mb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20

        start = time.perf_counter()
        run_dirs = discover_runs([root])
        report = analyze_runs(run_dirs)
        analyzed = time.perf_counter() - start

        start = time.perf_counter()
        write_reports(report, run_dirs, Path(tmp) / "out")
        written = time.perf_counter() - start

    score = report["summary"]["reproducibility_score"]
    print(f"runs: {len(run_dirs)}, adapter {adapter_mb:.2f} MB each, {total_mb:.0f} MB in all "
          f"(built in {built:.1f} s)")
    print(f"score {score:.2f}, {len(report['divergence'] or [])} runs differ")
    print(f"analyze_runs: {analyzed:.2f} s (target < 10 s)")
    print(f"write_reports: {written:.2f} s")


if __name__ == "__main__":
    main()
