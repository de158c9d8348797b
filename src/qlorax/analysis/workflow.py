"""What the commands and the publish workflow ask of analysis, each in one call.

`run_analyze` (discover runs, compare them, write the reports), `run_gates` (apply the quality
gates to a report) and `run_check` (re-hash one run directory against its manifest). They live
here, below the CLI, so that `verify`, `publish` and tests call them without importing a command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlorax import layout
from qlorax.analysis.render import write_reports
from qlorax.analysis.report import analyze_runs, load_report
from qlorax.analysis.runs import discover_runs, is_run_dir, verify_run_dir
from qlorax.errors import QloraxError
from qlorax.gates import QualityGates, gates_from_report, load_thresholds


def default_output_dir(paths: list[Path]) -> Path:
    """The single folder of runs when one was given, else the current directory."""
    if len(paths) == 1 and Path(paths[0]).is_dir() and not is_run_dir(Path(paths[0])):
        return Path(paths[0])
    return Path.cwd()


def run_analyze(paths: list[Path], output_dir: Path | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Discover runs under `paths`, analyze them and write the reports; returns (report, file paths)."""
    run_dirs = discover_runs([Path(p) for p in paths])
    out = Path(output_dir) if output_dir is not None else default_output_dir([Path(p) for p in paths])
    resolved = out.resolve()
    for run_dir in run_dirs:
        if resolved == run_dir or resolved.is_relative_to(run_dir):
            raise QloraxError(
                f"{out}: the output directory is inside run directory {run_dir}; writing reports there would "
                "alter the run (its manifest would no longer match). Choose another --output-dir."
            )
    report = analyze_runs(run_dirs)
    files = write_reports(report, run_dirs, out)
    return report, files


def run_gates(report_path: Path, thresholds: Path | None = None) -> tuple[bool, list[Any]]:
    """Evaluate the quality gates on a report (file or folder); returns (passed, [GateResult])."""
    gates = QualityGates(load_thresholds(thresholds) if thresholds is not None else None)
    source = report_path / layout.REPORT_JSON if report_path.is_dir() else report_path
    results = gates.evaluate(gates_from_report(load_report(report_path), str(source)))
    passed = all(r.passed for r in results if r.blocking)
    return passed, results


def run_check(run_dir: Path) -> dict[str, Any]:
    """Re-hash a run directory against its manifest; the integrity dict (see verify_run_dir)."""
    return verify_run_dir(require_dir(run_dir))


def require_dir(run_dir: Path) -> Path:
    """`run_dir` as a Path when it is a directory; else exit 2 saying what to pass."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise QloraxError(f"{run_dir}: no such directory. Pass a run directory written by `qlorax train`.")
    if not run_dir.is_dir():
        raise QloraxError(f"{run_dir}: not a directory. Pass a run directory written by `qlorax train`.")
    return run_dir
