"""CLI commands `analyze`, `gates` and `check` (registered by qlorax.cli). No torch, anywhere.

Each command is a thin wrapper around a plain function (`run_analyze`, `run_gates`,
`run_check`) that other commands (e.g. `verify` after training) can call directly.
Exit codes: 0 success; 1 a check failed (score < 1.0, blocking gate, manifest mismatch), ended
with `raise typer.Exit(EXIT_CHECK_FAILED)`; 2 bad input, raised as QloraxError and printed by
qlorax.cli.main.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from qlorax import layout
from qlorax.errors import EXIT_CHECK_FAILED, QloraxError
from qlorax.layout import report_get

# stdout for results; errors go to stderr through qlorax.cli.main.
console = Console(highlight=False)


def default_output_dir(paths: list[Path]) -> Path:
    """The single folder of runs when one was given, else the current directory."""
    from qlorax.analysis import is_run_dir

    if len(paths) == 1 and Path(paths[0]).is_dir() and not is_run_dir(Path(paths[0])):
        return Path(paths[0])
    return Path.cwd()


def run_analyze(paths: list[Path], output_dir: Path | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Discover runs under `paths`, analyze them and write the reports; returns (report, file paths)."""
    from qlorax.analysis import analyze_runs, discover_runs, write_reports

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
    from qlorax.analysis import load_report
    from qlorax.gates import QualityGates, gates_from_report, load_thresholds

    gates = QualityGates(load_thresholds(thresholds) if thresholds is not None else None)
    source = report_path / layout.REPORT_JSON if report_path.is_dir() else report_path
    results = gates.evaluate(gates_from_report(load_report(report_path), str(source)))
    passed = all(r.passed for r in results if r.blocking)
    return passed, results


def run_check(run_dir: Path) -> dict[str, Any]:
    """Re-hash a run directory against its manifest; the integrity dict (see verify_run_dir)."""
    from qlorax.analysis import verify_run_dir

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise QloraxError(f"{run_dir}: no such directory. Pass a run directory written by `qlorax train`.")
    if not run_dir.is_dir():
        raise QloraxError(f"{run_dir}: not a directory. Pass a run directory written by `qlorax train`.")
    return verify_run_dir(run_dir)


def _print_analyze(report: dict[str, Any], files: dict[str, Path]) -> None:
    meta = report_get(report, layout.REPORT_METADATA)
    metrics = report_get(report, layout.REPORT_METRICS)
    score = report_get(report, layout.REPORT_SCORE)
    table = Table(title="Reproducibility analysis", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    table.add_row("Runs analyzed", str(meta["total_runs_analyzed"]))
    table.add_row("Complete / incomplete / tampered",
                  f"{meta['complete_runs']} / {meta['incomplete_runs']} / {meta['tampered_runs']}")
    colour = "green" if score == 1.0 else "red"
    table.add_row("Reproducibility score",
                  f"[{colour}]{score:.1%}[/] ({metrics['matching_runs']}/{meta['total_runs_analyzed']})")
    table.add_row("Reference digest", (metrics["reference_digest"] or "-")[:16])
    table.add_row("Attribution", report_get(report, layout.REPORT_ATTRIBUTION))
    table.add_row("Report", str(files["json"]))
    table.add_row("Markdown", str(files["markdown"]))
    table.add_row("Loss curves", str(files["plot"]))
    console.print(table)
    entries = report_get(report, layout.REPORT_RUNS)
    if len(entries) <= 30:
        runs = Table(title="Runs")
        for column in ("run", "status", "digest", "matches", "environment", "threads"):
            runs.add_column(column)
        for run in entries:
            runs.add_row(run["name"], run["status"], (run["deterministic_digest"] or "-")[:12],
                         "[green]yes[/]" if run["matches_reference"] else "[red]no[/]",
                         f"{run['environment']}/{run['profile']}", str(run["threads"]))
        console.print(runs)
    for line in report_get(report, layout.REPORT_CONCLUSIONS):
        console.print(f"- {line}", soft_wrap=True, markup=False)


def _print_gates(results: list[Any]) -> None:
    table = Table(title="Quality gates")
    for column in ("gate", "value", "limit", "blocking", "verdict"):
        table.add_column(column)
    for result in results:
        if result.passed:
            verdict = "[green]PASS[/]"
        else:
            verdict = "[red]FAIL[/]" if result.blocking else "[yellow]WARN[/]"
        value = "missing" if result.value is None else str(result.value)
        table.add_row(result.name, value, f"{result.comparison} {result.limit}",
                      "yes" if result.blocking else "no", verdict)
    console.print(table)
    for result in results:
        if not result.passed:
            console.print(f"- {result.message}", soft_wrap=True, markup=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""

    @app.command()
    def analyze(
        dirs: Annotated[list[Path], typer.Argument(help="Run directories, or folders that contain them.")],
        output_dir: Annotated[
            Path | None,
            typer.Option("--output-dir", "-o", help="Where to write the reports (default: the single folder "
                         "of runs given, else the current directory)."),
        ] = None,
    ) -> None:
        """Compare runs: prove they are bit-identical, or show where and why they diverge."""
        report, files = run_analyze(dirs, output_dir)
        _print_analyze(report, files)
        if report_get(report, layout.REPORT_SCORE) != 1.0:
            raise typer.Exit(EXIT_CHECK_FAILED)

    @app.command()
    def gates(
        report: Annotated[Path, typer.Argument(help="A report JSON, or a folder holding "
                                                    f"{layout.REPORT_JSON}.")],
        thresholds: Annotated[
            Path | None, typer.Option("--thresholds", "-t", help="YAML overriding gate limits.")
        ] = None,
        audit_log: Annotated[
            Path | None, typer.Option("--audit-log", help=f"Audit log for the verdict (default: {layout.AUDIT_LOG} "
                                                          "beside the report, continuing verify's chain).")
        ] = None,
    ) -> None:
        """Apply the quality gates to an analysis report; exit 1 when a blocking gate fails."""
        from qlorax.ops.audit import AuditLogger

        passed, results = run_gates(report, thresholds)
        report_dir = report if report.is_dir() else report.parent
        AuditLogger(audit_log or report_dir / layout.AUDIT_LOG).log_gates(
            passed, [r.message for r in results if not r.passed])
        _print_gates(results)
        failed = sorted({r.name for r in results if r.blocking and not r.passed})
        if not passed:
            console.print(f"Blocking gate(s) failed: {', '.join(failed)}", soft_wrap=True, markup=False)
            raise typer.Exit(EXIT_CHECK_FAILED)
        console.print("All blocking gates passed.")

    @app.command()
    def check(
        run_dir: Annotated[Path, typer.Argument(help=f"A run directory with {layout.MANIFEST}.")],
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """Re-hash every file of a run against its manifest: missing, added and altered files."""
        result = run_check(run_dir)
        if as_json:
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            _print_check(result)
        if not result["intact"]:
            raise typer.Exit(EXIT_CHECK_FAILED)


def _print_check(result: dict[str, Any]) -> None:
    run_dir = result["run_dir"]
    if not result["has_manifest"]:
        console.print(f"{run_dir}: no {layout.MANIFEST}; not a finished run (or the manifest was "
                      "removed).", soft_wrap=True, markup=False)
        return
    for kind, label in (("irregular", "tampered (not a regular file of the run)"), ("altered", "altered"),
                        ("missing", "missing"), ("extra", "extra (not in manifest)")):
        for rel in result.get(kind, []):
            console.print(f"{label}: {rel}", soft_wrap=True, markup=False)
    for problem in result.get("manifest_errors") or []:
        console.print(f"manifest: {problem}", soft_wrap=True, markup=False)
    for problem in result.get("publication_problems") or []:
        console.print(f"publication: {problem}", soft_wrap=True, markup=False)
    withheld = result.get("withheld") or []
    if result["intact"]:
        snapshot = (f"; a published snapshot, withholding {', '.join(withheld)}" if withheld
                    else "; a published snapshot") if result.get("published") else ""
        console.print(f"{run_dir}: intact ({result['checked']} files match the manifest{snapshot}).",
                      soft_wrap=True, markup=False)
    else:
        console.print(f"{run_dir}: MISMATCH against {layout.MANIFEST}.", soft_wrap=True, markup=False)
