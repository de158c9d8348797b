"""Write an analysis report three ways: JSON for machines and gates, Markdown for people, a PNG
of the loss curves so a divergence is visible at a glance.

All files are written atomically; matplotlib is imported lazily (Agg canvas, no pyplot), so
importing this module stays cheap.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from qlorax import layout
from qlorax.analysis.report import is_number
from qlorax.analysis.traces import read_trace
from qlorax.artifacts import write_bytes_atomic, write_json_atomic, write_text_atomic
from qlorax.layout import report_get, report_set

RUN_CURVE_GID = "run:"
DIVERGENCE_GID = "divergence:"
_LEGEND_LIMIT = 12

Series = tuple[list[int], list[float]]


# --------------------------------------------------------------------------- loss curves


def _loss_series(trace: list[dict[str, Any]]) -> Series:
    steps, losses = [], []
    for index, record in enumerate(trace):
        value = record.get(layout.TRACE_LOSS)
        if value is None and isinstance(record.get(layout.TRACE_LOSS_BITS), str):
            try:
                value = float.fromhex(record[layout.TRACE_LOSS_BITS])
            except ValueError:
                value = None
        if is_number(value):
            steps.append(int(record.get(layout.TRACE_STEP, index + 1)))
            losses.append(float(value))
    return steps, losses


def _plot_diverging(ax: Any, delta_ax: Any, run: dict[str, Any], series: Series, entry: dict[str, Any],
                    reference: dict[int, float]) -> float:
    """A non-matching run: dashed red, its first divergent step marked, its loss minus the
    reference's in the lower panel (the curves overlap when runs differ by ULPs). Returns the
    smallest non-zero difference drawn (inf when none)."""
    name = run["name"]
    steps, losses = series
    step = entry.get("first_divergent_step")
    label = f"{name} (diverges at step {step})" if step is not None else f"{name} ({run.get('status')})"
    ax.plot(steps, losses, color="red", linestyle="--", linewidth=1.4, label=label, gid=f"{RUN_CURVE_GID}{name}")
    if step is not None:
        for axis in (ax, delta_ax):
            axis.axvline(step, color="red", linestyle=":", linewidth=1.0, alpha=0.8, gid=f"{DIVERGENCE_GID}{name}")
    shared = [(s, loss - reference[s]) for s, loss in zip(steps, losses, strict=True) if s in reference]
    if shared:
        delta_ax.plot([s for s, _ in shared], [d for _, d in shared], color="red", linestyle="--",
                      linewidth=1.0, gid=f"delta:{name}")
    return min([math.inf, *(abs(d) for _, d in shared if d)])


def plot_loss_curves(report: dict[str, Any], run_dirs: list[Path], path: Path) -> int:
    """Overlay every run's trace loss per step; returns how many run curves were drawn.

    Runs that differ from the reference are dashed red and labelled, with their first
    divergent step marked by a vertical line. `run_dirs` are the directories given to
    `analyze_runs`, in the same order as `report["runs"]`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = report_get(report, layout.REPORT_RUNS, None) or []
    dirs = [Path(d) for d in run_dirs] if len(run_dirs) == len(runs) else [Path(r["path"]) for r in runs]
    divergence = {d["run"]: d for d in report_get(report, layout.REPORT_DIVERGENCE, None) or []}
    series: dict[str, Series] = {}
    for run, run_dir in zip(runs, dirs, strict=True):
        if run.get("exit_code") not in (None, 0):
            continue  # failed in this verification: its directory is not this verification's run
        steps, losses = _loss_series(read_trace(run_dir / layout.TRACE) or [])
        if steps:
            series[run["name"]] = (steps, losses)
    reference_name = report_get(report, layout.REPORT_REFERENCE_RUN, None)
    reference = dict(zip(*series[reference_name], strict=True)) if reference_name in series else {}

    fig = Figure(figsize=(9, 7), dpi=100)
    FigureCanvasAgg(fig)
    ax, delta_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    palette = [f"C{i}" for i in range(10)]
    many = len(runs) > _LEGEND_LIMIT
    matching_drawn = 0
    smallest_delta = math.inf
    for run in (r for r in runs if r["name"] in series):
        name = run["name"]
        if not run.get("matches_reference"):
            smallest_delta = min(smallest_delta, _plot_diverging(
                ax, delta_ax, run, series[name], divergence.get(name, {}), reference))
            continue
        label = None if many and matching_drawn else name
        if many and not matching_drawn:
            label = f"{name} and the other matching runs"
        ax.plot(*series[name], color=palette[matching_drawn % len(palette)], linewidth=1.4, label=label,
                gid=f"{RUN_CURVE_GID}{name}")
        matching_drawn += 1
    delta_ax.axhline(0.0, color="grey", linewidth=0.8)
    delta_ax.set_yscale("symlog", linthresh=smallest_delta if math.isfinite(smallest_delta) else 1e-12)
    delta_ax.set_ylabel("loss - reference")
    delta_ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    score = report_get(report, layout.REPORT_SCORE)
    ax.set_title(f"Loss per step, {len(runs)} runs, reproducibility score {score:.1%}")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes_atomic(Path(path), buffer.getvalue())
    return count_run_curves(ax)


def count_run_curves(ax: Any) -> int:
    """Run curves on an Axes (Line2D objects tagged with a run gid; divergence markers excluded)."""
    return sum(1 for line in ax.get_lines() if (line.get_gid() or "").startswith(RUN_CURVE_GID))


# --------------------------------------------------------------------------- markdown


def _short(digest: Any, n: int = 12) -> str:
    return str(digest)[:n] if digest else "-"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _summary_lines(report: dict[str, Any]) -> list[str]:
    meta = report_get(report, layout.REPORT_METADATA)
    metrics = report_get(report, layout.REPORT_METRICS)
    return [
        "# Reproducibility report",
        "",
        f"**Reproducibility score: {report_get(report, layout.REPORT_SCORE):.1%}** "
        f"({metrics['matching_runs']} of {meta['total_runs_analyzed']} runs bit-identical to the reference)",
        "",
        f"- Reference digest: `{metrics['reference_digest'] or '-'}` "
        f"(run {metrics.get('reference_run') or '-'})",
        f"- Complete runs: {meta['complete_runs']}, incomplete: {meta['incomplete_runs']}, "
        f"tampered: {meta['tampered_runs']}",
        f"- Attribution: **{report_get(report, layout.REPORT_ATTRIBUTION)}**",
        f"- qlorax {meta['qlorax_version']}",
        "",
        "## Conclusions",
        "",
        *[f"- {_cell(c)}" for c in report_get(report, layout.REPORT_CONCLUSIONS, None) or []],
        "",
    ]


def _runs_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        "## Runs",
        "",
        "| run | status | digest | matches | environment | profile | threads | duration s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report_get(report, layout.REPORT_RUNS):
        status = run["status"] + (f" ({run['status_reason']})" if run.get("status_reason") else "")
        lines.append(
            f"| {_cell(run['name'])} | {_cell(status)} | `{_short(run['deterministic_digest'])}` | "
            f"{'yes' if run['matches_reference'] else 'no'} | {_cell(run['environment'])} | "
            f"{_cell(run['profile'])} | {_cell(run['threads'])} | {_cell(run.get('duration_seconds'))} | "
            f"{_cell(run.get('peak_memory_mb'))} |"
        )
    return lines


def _agreement_lines(report: dict[str, Any]) -> list[str]:
    lines = ["", "## Artifact agreement", "", "| file | distinct digests | agreeing runs | other digests |",
             "|---|---|---|---|"]
    for rel, info in report_get(report, layout.REPORT_ARTIFACT_AGREEMENT).items():
        others = [f"`{_short(d)}`: {', '.join(names)}" for d, names in info["digests"].items()
                  if d != info["reference_digest"]]
        if info.get("missing_in"):
            others.append("missing: " + ", ".join(info["missing_in"]))
        lines.append(f"| {rel} | {info['distinct_digests']} | {info['agreeing_runs']} | "
                     f"{_cell('; '.join(others)) or '-'} |")
    return lines


def _tensor_row(t: dict[str, Any]) -> str:
    if "missing_in" in t:
        return f"| {t['name']} | {t.get('shape')} | missing in {t['missing_in']} | | |"
    if t.get("shape_mismatch"):
        return f"| {t['name']} | {t['shape_reference']} vs {t['shape_run']} | shape mismatch | | |"
    if t.get("dtype_mismatch"):
        return f"| {t['name']} | {t.get('shape')} | dtype {t['dtype_reference']} vs {t['dtype_run']} | | |"
    return (f"| {t['name']} | {t['shape']} | {t['max_abs_diff']:.3g} | {t['max_rel_diff']:.3g} | "
            f"{t['max_ulp_distance']} |")


def _divergence_entry_lines(entry: dict[str, Any]) -> list[str]:
    lines = [f"### {entry['run']} ({entry['status']})", "", f"- Reason: {_cell(entry.get('reason'))}"]
    if entry.get("differing_files"):
        lines.append(f"- Differing files: {', '.join(entry['differing_files'])}")
    if entry.get("first_divergent_step") is not None:
        lines.append(f"- First divergent step: {entry['first_divergent_step']} "
                     f"(field {entry['first_divergent_field']}; all differing: "
                     f"{', '.join(entry.get('differing_fields') or [])})")
        ref, run = entry.get("reference_values") or {}, entry.get("run_values") or {}
        for key in sorted(set(ref) | set(run)):
            if ref.get(key) != run.get(key):
                lines.append(f"  - {key}: reference `{ref.get(key)}`, run `{run.get(key)}`")
    if entry.get("note"):
        lines.append(f"- Note: {_cell(entry['note'])}")
    if entry.get("tensor_error"):
        lines.append(f"- Tensors: {_cell(entry['tensor_error'])}")
    if entry.get("tensors"):
        lines += ["", "| tensor | shape | max abs diff | max rel diff | max ULP |", "|---|---|---|---|---|"]
        lines += [_tensor_row(t) for t in entry["tensors"]]
    lines.append("")
    return lines


def _environment_lines(report: dict[str, Any]) -> list[str]:
    cross = report_get(report, layout.REPORT_CROSS_ENVIRONMENT)
    lines = ["## Environments", "", "| group | runs | distinct digests | agrees within |", "|---|---|---|---|"]
    for group in cross["groups"]:
        lines.append(f"| {_cell(group['label'])} | {', '.join(group['runs'])} | "
                     f"{group['distinct_digests']} | {'yes' if group['agreement_within'] else 'no'} |")
    return lines + [
        "",
        f"- Agreement across groups: {'yes' if cross['agreement_across_groups'] else 'no'}",
        "- Fingerprint keys that differ between groups: "
        f"{', '.join(cross['differing_fingerprint_keys']) or 'none'}",
        "",
    ]


def render_markdown(report: dict[str, Any], plot_name: str | None = layout.LOSS_PLOT) -> str:
    """The human-readable report: score, runs, artifact agreement, divergence, environments."""
    divergence = report_get(report, layout.REPORT_DIVERGENCE, None) or []
    lines = [*_summary_lines(report), *_runs_lines(report), *_agreement_lines(report), "", "## Divergence", ""]
    if not divergence:
        lines.append("None: every run matches the reference.")
    for entry in divergence:
        lines += _divergence_entry_lines(entry)
    lines += _environment_lines(report)
    if plot_name:
        lines += ["## Loss curves", "", f"![loss curves]({plot_name})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- files


def write_reports(report: dict[str, Any], run_dirs: list[Path], output_dir: Path) -> dict[str, Path]:
    """Write the JSON report, report.md and loss_curves.png into output_dir; return their paths.

    The number of run curves drawn is recorded in the JSON under
    report["report_files"]["loss_curves_plotted"] (one per run with a trace).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = {"json": layout.REPORT_JSON, "markdown": layout.REPORT_MARKDOWN, "plot": layout.LOSS_PLOT}
    paths = {kind: output_dir / name for kind, name in names.items()}
    curves = plot_loss_curves(report, run_dirs, paths["plot"])
    report_set(report, layout.REPORT_FILES, {**names, layout.REPORT_CURVES_PLOTTED[-1]: curves})
    write_text_atomic(paths["markdown"], render_markdown(report, layout.LOSS_PLOT))
    write_json_atomic(paths["json"], report)
    return paths
