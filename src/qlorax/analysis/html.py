"""The report to look at: one self-contained HTML page for a verification or analysis directory.

`write_html` reads reproducibility_analysis_report.json (and loss_curves.png, inlined as a
data: URI) from a directory written by `qlorax verify` or `qlorax analyze` and writes one page:
the verdict and score, the runs, the loss curves, the divergence and environment differences
when runs differ, the default quality gates and the inputs' identities (from the runs'
results.json where they can still be read). No scripts and nothing fetched: a Content Security
Policy forbids every external resource, and every value is escaped with html.escape. No torch.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from qlorax import layout
from qlorax.analysis.environments import flatten
from qlorax.artifacts import read_json, write_text_atomic
from qlorax.errors import QloraxError
from qlorax.layout import report_get

REPORT_HTML = layout.REPORT_HTML
_TENSOR_ROWS = 20

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222;line-height:1.4}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em;display:block;overflow-x:auto;max-width:100%}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f2f2f2} code{font-size:.85em;word-break:break-all}
.verdict{font-size:1.3em;padding:.6em 1em;border-radius:6px;margin:.8em 0}
.pass{background:#e3f6e3;border:2px solid #2e8b2e} .fail{background:#fde4e4;border:2px solid #c0392b}
.warn{color:#9a6700} .yes{color:#2e8b2e;font-weight:bold} .no{color:#c0392b;font-weight:bold}
img{max-width:100%;border:1px solid #ddd}
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(value: Any) -> str:
    """A value as escaped text (None as '-')."""
    return "-" if value is None else html.escape(str(value), quote=True)


def _code(value: Any) -> str:
    return f"<code>{esc(value)}</code>" if value else "-"


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table; `rows` hold cells that are already escaped HTML."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _yes(flag: Any) -> str:
    return '<span class="yes">yes</span>' if flag else '<span class="no">no</span>'


# --------------------------------------------------------------------------- facts around the report


def _run_dir(directory: Path, run: dict[str, Any]) -> Path | None:
    """Where a run's files are now: its recorded path, or the directory's run of that name."""
    for candidate in (Path(str(run.get("path") or "")), directory / str(run.get("name") or "")):
        if str(candidate) not in ("", ".") and (candidate / layout.RESULTS).is_file():
            return candidate
    return None


def _read_results(directory: Path, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """results.json of every run still readable, by run name."""
    out = {}
    for run in report_get(report, layout.REPORT_RUNS, None) or []:
        where = _run_dir(directory, run)
        try:
            data = read_json(where / layout.RESULTS) if where is not None else None
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict):
            out[str(run["name"])] = data
    return out


def input_identities(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, list[str]]]:
    """(what, value, runs) for each distinct config hash, data digest/commit and model digest."""
    fields = (("config hash", ("config_hash",)), ("data", ("data", "path")), ("data sha256", ("data", "sha256")),
              ("data git commit", ("data", "commit")), ("base model", ("base_model", "id")),
              ("base model digest", ("base_model", "digest")))
    rows = []
    for label, path in fields:
        values: dict[str, list[str]] = {}
        for name, data in results.items():
            value = layout.report_get(data, path, None)
            if value is not None:
                values.setdefault(str(value), []).append(name)
        rows += [(label, value, names) for value, names in values.items()]
    return rows


def _processors(report: dict[str, Any]) -> dict[str, str]:
    """Each run's processor, from its environment group's fingerprint."""
    out = {}
    for group in report_get(report, layout.REPORT_CROSS_ENVIRONMENT, {}).get("groups") or []:
        fp = group.get("fingerprint") or {}
        text = (f"emulated {fp['emulated_cpu']}" if fp.get("emulated_cpu") else
                f"{fp.get('cpu_model', '?')} ({fp.get('cpu_capability', '?')})" if fp else "unknown")
        out.update({str(name): text for name in group.get("runs") or []})
    return out


def _adapter_digests(report: dict[str, Any]) -> dict[str, str]:
    agreement = report_get(report, layout.REPORT_ARTIFACT_AGREEMENT, {}) or {}
    digests = (agreement.get(layout.ADAPTER_WEIGHTS) or {}).get("digests") or {}
    return {str(name): digest for digest, names in digests.items() for name in names}


def default_gates(report: dict[str, Any], source: str) -> list[Any] | str:
    """The default quality gates' results, or why they could not be evaluated."""
    from qlorax.gates import QualityGates, gates_from_report

    try:
        return QualityGates().evaluate(gates_from_report(report, source))
    except QloraxError as exc:
        return exc.message


# --------------------------------------------------------------------------- sections


def _verdict_section(report: dict[str, Any], gates: list[Any] | str) -> str:
    score = report_get(report, layout.REPORT_SCORE)
    metrics = report_get(report, layout.REPORT_METRICS)
    total = report_get(report, layout.REPORT_TOTAL_RUNS)
    gates_ok = not isinstance(gates, str) and all(g.passed for g in gates if g.blocking)
    ok = score == 1.0
    verdict = "Reproducible: every run is bit-identical" if ok else "Not reproducible: runs differ"
    conclusions = "".join(f"<li>{esc(c)}</li>" for c in report_get(report, layout.REPORT_CONCLUSIONS, []) or [])
    return (f'<div class="verdict {"pass" if ok else "fail"}" id="verdict"><strong>{esc(verdict)}</strong><br>'
            f'Reproducibility score <strong id="score">{esc(f"{score:.3f}")}</strong> ({esc(f"{score:.1%}")}): '
            f"{esc(metrics.get('matching_runs'))} of {esc(total)} runs match the reference. "
            f"Quality gates: <strong>{'passed' if gates_ok else 'failed'}</strong>.</div>"
            f"<p>Reference run {esc(metrics.get('reference_run'))}, deterministic digest "
            f"{_code(metrics.get('reference_digest'))}; attribution "
            f"<strong>{esc(report_get(report, layout.REPORT_ATTRIBUTION, None))}</strong>.</p>"
            f"<ul>{conclusions}</ul>")


def _runs_section(report: dict[str, Any]) -> str:
    processors, adapters = _processors(report), _adapter_digests(report)
    rows = []
    for run in report_get(report, layout.REPORT_RUNS, []) or []:
        name = str(run.get("name"))
        status = str(run.get("status")) + (f" ({run['status_reason']})" if run.get("status_reason") else "")
        rows.append([esc(name), esc(status), _yes(run.get("matches_reference")), esc(run.get("threads")),
                     esc(run.get("workers") or 1), esc(processors.get(name, "unknown")),
                     esc(f"{run.get('environment')}/{run.get('profile')}"), _code(adapters.get(name)),
                     _code(run.get("deterministic_digest")), esc(run.get("duration_seconds")),
                     esc(run.get("peak_memory_mb"))])
    headers = ["run", "status", "matches", "threads", "workers", "processor", "environment/profile",
               "adapter sha256", "deterministic digest", "duration s", "peak MB"]
    return "<h2>Runs</h2>" + _table(headers, rows, "runs")


def _plot_section(directory: Path) -> str:
    plot = directory / layout.LOSS_PLOT
    if not plot.is_file():
        return f"<h2>Loss curves</h2><p>No {esc(layout.LOSS_PLOT)} in this directory.</p>"
    data = base64.b64encode(plot.read_bytes()).decode("ascii")
    return ('<h2>Loss curves</h2><img id="loss-curves" alt="training loss per step for every run; diverging runs '
            f'dashed red, the first divergent step marked" src="data:image/png;base64,{data}">')


def _tensor_rows(entry: dict[str, Any]) -> list[list[str]]:
    tensors = sorted((t for t in entry.get("tensors") or [] if "max_ulp_distance" in t),
                     key=lambda t: -t["max_ulp_distance"])
    return [[esc(entry.get("run")), _code(t.get("name")), esc(t.get("shape")), esc(t.get("max_abs_diff")),
             esc(t.get("max_rel_diff")), esc(t.get("max_ulp_distance"))] for t in tensors[:_TENSOR_ROWS]]


def _divergence_section(report: dict[str, Any]) -> str:
    entries = report_get(report, layout.REPORT_DIVERGENCE, None) or []
    if not entries:
        return "<h2>Divergence</h2><p>None: every run matches the reference.</p>"
    rows, tensor_rows = [], []
    for entry in entries:
        worst = max((t for t in entry.get("tensors") or [] if "max_ulp_distance" in t),
                    key=lambda t: t["max_ulp_distance"], default=None)
        rows.append([esc(entry.get("run")), esc(entry.get("status")), esc(entry.get("reason")),
                     esc(entry.get("first_divergent_step")), esc(entry.get("first_divergent_field")),
                     esc(", ".join(entry.get("differing_files") or []) or None),
                     _code(worst["name"]) if worst else "-", esc(worst["max_ulp_distance"] if worst else None),
                     esc(entry.get("note") or entry.get("tensor_error"))])
        tensor_rows += _tensor_rows(entry)
    out = "<h2>Divergence</h2>" + _table(
        ["run", "status", "reason", "first divergent step", "field", "differing files", "worst tensor",
         "max ULP", "note"], rows, "divergence")
    if tensor_rows:
        out += (f"<h3>Differing adapter tensors (largest ULP first, at most {_TENSOR_ROWS} per run)</h3>"
                + _table(["run", "tensor", "shape", "max abs diff", "max rel diff", "max ULP"], tensor_rows))
    return out


def _environment_section(report: dict[str, Any]) -> str:
    cross = report_get(report, layout.REPORT_CROSS_ENVIRONMENT, {}) or {}
    groups = cross.get("groups") or []
    rows = [[esc(g.get("label")), esc(", ".join(g.get("runs") or [])), esc(g.get("distinct_digests")),
             _yes(g.get("agreement_within"))] for g in groups]
    out = "<h2>Environments</h2>" + _table(["group", "runs", "distinct digests", "agrees within"], rows)
    keys = cross.get("differing_fingerprint_keys") or []
    if not keys:
        return out + "<p>No fingerprint key differs between the groups.</p>"
    flats = [flatten(g.get("fingerprint") or {}) for g in groups]
    diff_rows = [[_code(key), *(esc(flat.get(key)) for flat in flats)] for key in keys]
    return out + ("<h3>Environment differences</h3>"
                  + _table(["fingerprint key", *(str(g.get("label")) for g in groups)], diff_rows, "env-diff"))


def _gates_section(gates: list[Any] | str) -> str:
    if isinstance(gates, str):
        return f"<h2>Quality gates (defaults)</h2><p>Not evaluated: {esc(gates)}</p>"
    rows = []
    for gate in gates:
        verdict = ('<span class="yes">PASS</span>' if gate.passed else
                   '<span class="no">FAIL</span>' if gate.blocking else '<span class="warn">WARN</span>')
        rows.append([esc(gate.name), esc("missing" if gate.value is None else gate.value),
                     esc(f"{gate.comparison} {gate.limit}"), "yes" if gate.blocking else "no", verdict,
                     esc("" if gate.passed else gate.message)])
    return "<h2>Quality gates (defaults)</h2>" + _table(
        ["gate", "value", "limit", "blocking", "verdict", "message"], rows, "gates")


def _inputs_section(results: dict[str, dict[str, Any]]) -> str:
    rows = [[esc(label), _code(value), esc(", ".join(names))] for label, value, names in input_identities(results)]
    if not rows:
        return ("<h2>Inputs</h2><p>The runs' results.json could not be read from here "
                "(the run directories moved?): no input identities to show.</p>")
    return "<h2>Inputs</h2>" + _table(["input", "identity", "runs"], rows, "inputs")


# --------------------------------------------------------------------------- the page


def render_html(report: dict[str, Any], directory: Path, gates: list[Any] | str | None = None) -> str:
    """The whole page as a string; `directory` holds the report, its plot and (usually) the runs."""
    directory = Path(directory)
    if gates is None:
        gates = default_gates(report, str(directory / layout.REPORT_JSON))
    meta = report_get(report, layout.REPORT_METADATA, {}) or {}
    body = "".join([
        _verdict_section(report, gates), _runs_section(report), _plot_section(directory),
        _divergence_section(report), _environment_section(report), _gates_section(gates),
        _inputs_section(_read_results(directory, report)),
    ])
    title = f"qlorax reproducibility report: {directory.resolve().name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{esc(title)}</h1><p>qlorax {esc(meta.get('qlorax_version'))}, "
            f"{esc(meta.get('total_runs_analyzed'))} runs analysed.</p>{body}</body></html>\n")


def write_html(directory: Path, out: Path | None = None, report: dict[str, Any] | None = None) -> Path:
    """Write the page for the report in `directory` to `out` (default: directory/report.html)."""
    from qlorax.analysis.report import load_report

    directory = Path(directory)
    if report is None:
        if not (directory / layout.REPORT_JSON).is_file():
            raise QloraxError(f"{directory}: no {layout.REPORT_JSON} here. Pass a directory written by "
                              "`qlorax verify` or `qlorax analyze` (they write the report there).")
        report = load_report(directory)
    score = report_get(report, layout.REPORT_SCORE, None)
    if not isinstance(score, int | float) or isinstance(score, bool):
        raise QloraxError(f"{directory / layout.REPORT_JSON}: not a qlorax reproducibility report (no number at "
                          f"{layout.dotted(layout.REPORT_SCORE)}).")
    target = Path(out) if out is not None else directory / REPORT_HTML
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, render_html(report, directory))
    return target
