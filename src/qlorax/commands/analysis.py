"""CLI commands `analyze`, `gates`, `check` and `report` (registered by qlorax.cli). No torch, anywhere.

Each command is a thin wrapper around a plain function of `qlorax.analysis.workflow`
(`run_analyze`, `run_gates`, `run_check`) that other workflows (`verify`, `publish`) call directly.
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
from qlorax.errors import EXIT_CHECK_FAILED
from qlorax.layout import report_get

# stdout for results; errors go to stderr through qlorax.cli.main.
console = Console(highlight=False)


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


def analyze(
    dirs: Annotated[list[str], typer.Argument(help="Run directories, folders that contain them, or stored "
                                                   "runs (s3://BUCKET/PREFIX).")],
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", "-o", help="Where to write the reports (default: the single folder "
                     "of runs given, else the current directory)."),
    ] = None,
) -> None:
    """Compare runs: prove they are bit-identical, or show where and why they diverge."""
    from contextlib import ExitStack

    from qlorax.analysis.workflow import run_analyze
    from qlorax.usecases.durable import is_storage_uri, materialised

    if output_dir is None and any(is_storage_uri(target) for target in dirs):
        output_dir = Path.cwd()  # a stored run is read into a temporary directory: the reports go here
    with ExitStack() as stack:
        local = [stack.enter_context(materialised(target)) for target in dirs]
        report, files = run_analyze(local, output_dir)
    _print_analyze(report, files)
    if report_get(report, layout.REPORT_SCORE) != 1.0:
        raise typer.Exit(EXIT_CHECK_FAILED)


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
    from qlorax.analysis.workflow import run_gates
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


def check(
    run_dir: Annotated[str, typer.Argument(help=f"A run directory with {layout.MANIFEST}, or a stored run "
                                                "(s3://BUCKET/PREFIX: the files its manifest lists are read).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Re-hash every file of a run against its manifest: missing, added and altered files."""
    from qlorax.analysis.workflow import run_check
    from qlorax.usecases.durable import materialised

    with materialised(run_dir) as local:
        result = run_check(local)
    result["run_dir"] = run_dir
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


def report(
    directory: Annotated[Path, typer.Argument(help="A verification or analysis directory holding "
                                                   f"{layout.REPORT_JSON}.")],
    html_out: Annotated[
        Path | None, typer.Option("--html", help="Where to write the page (default: report.html in DIR).")
    ] = None,
) -> None:
    """Write the report as one self-contained HTML page: verdict, runs, loss curves, divergence, gates, inputs."""
    from qlorax.analysis.html import write_html

    path = write_html(directory, html_out)
    console.print(f"{directory}: report written to {path}", soft_wrap=True, markup=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command()(analyze)
    app.command()(gates)
    app.command()(check)
    app.command()(report)
