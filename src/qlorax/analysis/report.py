"""The reproducibility report: build it from run directories, explain it in sentences, read it back.

reproducibility_score is the share of all runs whose verified deterministic artifacts equal
the most common set; the rest of the report explains any run that does not match well enough
to act on it (divergent step, tensor ULPs, environment attribution).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from qlorax import __version__, layout
from qlorax.analysis.environments import cross_environment, env_info
from qlorax.analysis.runs import (
    STATUS_INCOMPLETE,
    STATUS_MISMATCH,
    STATUS_OK,
    RunFacts,
    display_path,
    failed_run,
    load_run,
    run_names,
)
from qlorax.analysis.tensors import compare_adapters, load_tensors
from qlorax.analysis.traces import compare_traces, read_trace
from qlorax.artifacts import json_safe, read_json
from qlorax.errors import QloraxError
from qlorax.layout import report_get, report_set


def is_number(value: Any) -> bool:
    """An int or float that is not a bool (JSON true must not count as 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt_float(value: Any) -> str:
    """Shortest round-trip repr, so two floats one ULP apart never print the same."""
    return repr(value) if is_number(value) else str(value)


def _metric_stats(ok: list[RunFacts]) -> dict[str, Any]:
    with_results = [r for r in ok if r.results is not None]
    keys = sorted({k for r in with_results for k, v in r.results.items() if is_number(v)})
    stats: dict[str, Any] = {}
    for key in keys:
        values = [r.results[key] for r in with_results if is_number(r.results.get(key))]
        arr = np.asarray(values, dtype=np.float64)
        stats[key] = {
            "mean": float(np.mean(arr)),
            "variance": float(np.var(arr)),
            "min": float(np.min(arr)),
            "max": float(np.max(arr)),
            "runs": len(values),
            "identical": len(values) == len(with_results) and len({json.dumps(v) for v in values}) == 1,
        }
    return stats


def _reference(ok: list[RunFacts]) -> tuple[str | None, RunFacts | None]:
    """The most common digest among verified runs (ties go to the earliest run) and its first run."""
    counts = Counter(r.deterministic_digest for r in ok)
    first_index: dict[str | None, int] = {}
    for i, r in enumerate(ok):
        first_index.setdefault(r.deterministic_digest, i)
    digest = max(counts, key=lambda d: (counts[d], -first_index[d])) if counts else None
    return digest, next((r for r in ok if r.deterministic_digest == digest), None)


def _run_entry(run: RunFacts, matches: bool) -> dict[str, Any]:
    info = env_info(run)
    metadata = run.metadata or {}
    return {
        "name": run.name,
        "path": display_path(run.path),
        "status": run.status,
        "status_reason": run.status_reason,
        "deterministic_digest": run.deterministic_digest,
        "matches_reference": matches,
        "environment_fingerprint_sha256": info["fingerprint_sha256"],
        "threads": info["threads"],
        "workers": info["workers"],
        "profile": info["profile"],
        "environment": info["environment"],
        "artifact_count": (run.manifest or {}).get("artifact_count"),
        "duration_seconds": metadata.get("duration_seconds"),
        "peak_memory_mb": metadata.get("peak_memory_mb"),
        "integrity": run.integrity,
        "exit_code": run.exit_code,
    }


def _summary(runs: list[RunFacts], score: float, matching: int, attribution: str) -> dict[str, Any]:
    """The flat numbers the quality gates read."""
    metas = [r.metadata or {} for r in runs]
    durations = [m["duration_seconds"] for m in metas if is_number(m.get("duration_seconds"))]
    memory = [m["peak_memory_mb"] for m in metas if is_number(m.get("peak_memory_mb"))]
    counts_complete = [len(r.manifest["files"]) for r in runs if r.status != STATUS_INCOMPLETE
                       and r.manifest is not None and isinstance(r.manifest.get("files"), dict)]
    return {
        "reproducibility_score": score,
        "training_duration": max(durations) if durations else None,
        "peak_memory_mb": max(memory) if memory else None,
        "artifact_count": min(counts_complete) if counts_complete else None,
        "total_runs": len(runs),
        "matching_runs": matching,
        "attribution": attribution,
    }


def analyze_runs(run_dirs: list[Path], exit_codes: list[int] | None = None) -> dict[str, Any]:
    """Compare run directories and build the reproducibility report (see docs for the keys).

    reproducibility_score is the share of ALL runs whose verified deterministic artifacts
    equal the most common set; incomplete and tampered runs count in the denominator and
    never match, so 1.0 means every run is complete, intact and bit-identical. `exit_codes`
    (a verification's own runs, in order): a run whose process did not exit 0 is failed and
    its directory is not read, whatever it holds.
    """
    paths = [Path(p).resolve() for p in run_dirs]
    if not paths:
        raise QloraxError("no run directories to analyze.")
    codes: list[int | None] = list(exit_codes) if exit_codes is not None else [None] * len(paths)
    runs = [failed_run(p, n, c) if c not in (None, 0) else load_run(p, n, c)
            for p, n, c in zip(paths, run_names(paths), codes, strict=True)]
    ok = [r for r in runs if r.status == STATUS_OK]
    reference_digest, reference = _reference(ok)
    matching = [r for r in ok if r.deterministic_digest == reference_digest]
    score = len(matching) / len(runs)
    cross = cross_environment(runs)

    report: dict[str, Any] = {}
    report_set(report, layout.REPORT_METADATA, {
        "total_runs_analyzed": len(runs),
        "complete_runs": len(ok),
        "incomplete_runs": sum(r.status == STATUS_INCOMPLETE for r in runs),
        "tampered_runs": sum(r.status == STATUS_MISMATCH for r in runs),
        "qlorax_version": __version__,
        "run_dirs": [display_path(p) for p in paths],
    })
    report_set(report, layout.REPORT_METRICS, {
        "reproducibility_score": score,
        "reference_digest": reference_digest,
        "reference_run": reference.name if reference else None,
        "matching_runs": len(matching),
        "matching_run_names": [r.name for r in matching],
        "per_metric": _metric_stats(ok),
    })
    report_set(report, layout.REPORT_ARTIFACT_AGREEMENT, _artifact_agreement(runs, reference))
    report_set(report, layout.REPORT_RUNS, [_run_entry(r, r in matching) for r in runs])
    report_set(report, layout.REPORT_DIVERGENCE,
               _divergence(runs, reference, matching) if len(matching) != len(runs) else None)
    report_set(report, layout.REPORT_CROSS_ENVIRONMENT, cross)
    report_set(report, layout.REPORT_SUMMARY, _summary(runs, score, len(matching), cross["attribution"]))
    report_set(report, layout.REPORT_CONCLUSIONS, _conclusions(report, runs))
    return json_safe(report)


def _artifact_agreement(runs: list[RunFacts], reference: RunFacts | None) -> dict[str, Any]:
    """Per deterministic file: how many distinct digests, and which runs hold each."""
    names = sorted(set(layout.DETERMINISTIC_FILES) | {rel for r in runs for rel in r.file_digests})
    out: dict[str, Any] = {}
    for rel in names:
        digests: dict[str, list[str]] = {}
        missing = []
        for run in runs:
            digest = run.file_digests.get(rel)
            if digest is None:
                missing.append(run.name)
            else:
                digests.setdefault(digest, []).append(run.name)
        if not digests:
            continue
        ref_digest = reference.file_digests.get(rel) if reference else None
        if ref_digest is None:
            ref_digest = max(digests, key=lambda d: len(digests[d]))
        out[rel] = {
            "distinct_digests": len(digests),
            "agreeing_runs": len(digests.get(ref_digest, [])),
            "reference_digest": ref_digest,
            "digests": dict(sorted(digests.items(), key=lambda kv: (-len(kv[1]), kv[0]))),
            "missing_in": missing,
        }
    return out


class _ReferenceAdapter:
    """The reference run's adapter tensors, loaded on first need; a load error is remembered."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors: dict[str, np.ndarray] | None = None
        self.error: str | None = None

    def compare(self, run_path: Path) -> dict[str, Any]:
        """compare_adapters against a run; the tensor section of its divergence entry."""
        name = layout.ADAPTER_WEIGHTS
        if not (run_path / name).is_file():
            return {"tensors": [], "tensor_error": f"{name} is missing in the run"}
        try:
            if self.tensors is None and self.error is None:
                self.tensors = load_tensors(self.path / name)
            if self.tensors is None:
                raise ValueError(self.error)
            return compare_adapters(self.tensors, run_path / name)
        except Exception as exc:  # a corrupt safetensors header is a finding, not a crash
            if self.tensors is None:
                self.error = self.error or str(exc)
            return {"tensors": [], "tensor_error": f"cannot compare {name}: {exc}"}


def _divergence(runs: list[RunFacts], reference: RunFacts | None,
                matching: list[RunFacts]) -> list[dict[str, Any]]:
    """One entry per run that does not match: why, which files, the first divergent step, tensors."""
    entries = []
    ref_trace = read_trace(reference.path / layout.TRACE) if reference else None
    adapter = _ReferenceAdapter(reference.path) if reference else None
    for run in runs:
        if run in matching:
            continue
        entry: dict[str, Any] = {"run": run.name, "status": run.status, "reason": run.status_reason or (
            "deterministic artifacts differ from the reference")}
        entries.append(entry)
        if run.exit_code not in (None, 0):
            entry["note"] = "not compared: its training process failed in this verification"
            continue
        if reference is None or adapter is None:
            entry["note"] = "no complete, intact run to compare against"
            continue
        entry["reference_run"] = reference.name
        entry["differing_files"] = sorted(
            rel for rel in set(reference.file_digests) | set(run.file_digests)
            if reference.file_digests.get(rel) != run.file_digests.get(rel))
        trace = read_trace(run.path / layout.TRACE)
        if ref_trace is None or trace is None:
            entry.update({"first_divergent_step": None, "first_divergent_field": None,
                          "note": f"{layout.TRACE} missing or unreadable in the "
                                  f"{'reference' if ref_trace is None else 'run'}"})
        else:
            entry.update(compare_traces(ref_trace, trace))
        entry["tensors"] = []
        if layout.ADAPTER_WEIGHTS in entry["differing_files"]:
            entry.update(adapter.compare(run.path))
    return entries


def _integrity_sentences(run: RunFacts) -> list[str]:
    integ = run.integrity
    out = [f"Run {run.name}: {rel} does not match its manifest (altered after the run)." for rel in integ["altered"]]
    out += [f"Run {run.name}: {rel} is listed in the manifest but missing." for rel in integ["missing"]]
    out += [f"Run {run.name}: {rel} is not in the manifest (added after the run)." for rel in integ["extra"]]
    out += [f"Run {run.name}: {problem}." for problem in integ.get("manifest_errors") or []]
    return out


def _divergence_sentence(run: RunFacts, entry: dict[str, Any]) -> str:
    """Where a complete, intact run parts from the reference, and how far its tensors moved."""
    step = entry.get("first_divergent_step")
    fieldname = entry.get("first_divergent_field")
    if step is not None:
        a, b = entry.get("reference_values") or {}, entry.get("run_values") or {}
        detail = ""
        shown = (layout.TRACE_LOSS, layout.TRACE_GRAD_NORM, layout.TRACE_LR, layout.TRACE_TOKENS)
        if fieldname in shown and fieldname in a and fieldname in b:
            detail = f": {_fmt_float(b[fieldname])} vs {_fmt_float(a[fieldname])} in the reference"
        elif fieldname == "trace_length":
            detail = f": {entry.get('note')}"
        text = f"Run {run.name} diverges from the reference at step {step} ({fieldname}){detail}."
    else:
        files = ", ".join(entry.get("differing_files") or []) or "deterministic artifacts"
        text = f"Run {run.name} has an identical trace but different {files}."
    if entry.get("tensors"):
        diffs = [t for t in entry["tensors"] if "max_ulp_distance" in t]
        extra = ""
        if diffs:
            worst = max(diffs, key=lambda t: t["max_ulp_distance"])
            extra = (f"; max {worst['max_ulp_distance']} ULP, max abs diff "
                     f"{_fmt_float(worst['max_abs_diff'])} in {worst['name']}")
        verb = "differs" if entry["tensors_differing"] == 1 else "differ"
        text += f" {entry['tensors_differing']} of {entry['tensors_compared']} adapter tensors {verb}{extra}."
        if entry.get("shapes_differ"):
            text += " Tensor shapes differ: the runs were not trained with the same config."
    return text


def _attribution_sentences(cross: dict[str, Any]) -> list[str]:
    attribution = cross["attribution"]
    if attribution == "environment_drift":
        keys = ", ".join(cross["drift_keys"]) or "the environment fingerprint"
        return [f"Differences follow the environment: each environment group agrees within itself, and "
                f"the groups differ in {keys}. This is environment drift, not nondeterminism."]
    if attribution == "nondeterminism":
        within = [g["label"] for g in cross["groups"] if not g["agreement_within"]]
        if within:
            return [f"Runs differ within one identical environment ({'; '.join(within)}): nondeterminism."]
        return ["Runs differ across environments that differ only in thread count or number of workers: the "
                "result depends on them (nondeterminism)."]
    if attribution == "run_integrity":
        return ["All complete, intact runs agree; only incomplete or tampered runs differ."]
    if attribution == "tokenization_drift":
        return ["The runs were given the same config and data file but tokenized it differently "
                "(data.tokenized_sha256 in results.json differs: a tokenizer or transformers change); runs "
                "with the same token ids agree, so this is tokenization drift, not nondeterminism."]
    if attribution == "input_difference":
        return ["The differing runs were given different inputs (config hash or data digest in results.json): "
                "runs with the same inputs agree, so this is neither environment drift nor nondeterminism."]
    return []


def _all_match_sentence(report: dict[str, Any], total: int) -> str:
    entries = report_get(report, layout.REPORT_RUNS)
    threads = sorted({str(r["threads"]) for r in entries if r["threads"] is not None})
    workers = sorted({str(r.get("workers") or 1) for r in entries})
    envs = sorted({f"{r['environment']}/{r['profile']}" for r in entries if r["environment"]})
    where = []
    if len(threads) > 1:
        where.append(f"thread counts {', '.join(threads)}")
    if len(workers) > 1:
        where.append(f"worker counts {', '.join(workers)}")
    if len(envs) > 1:
        where.append(f"environments {', '.join(envs)}")
    suffix = f" across {' and '.join(where)}" if where else ""
    noun = "run is" if total == 1 else f"{total} runs are"
    return f"All {noun} bit-identical{suffix}." if total > 1 else f"The {noun} complete and intact."


def _conclusions(report: dict[str, Any], runs: list[RunFacts]) -> list[str]:
    """The report in sentences: the score, then one finding per differing run, then the attribution."""
    total = report_get(report, layout.REPORT_TOTAL_RUNS)
    metrics = report_get(report, layout.REPORT_METRICS)
    score = report_get(report, layout.REPORT_SCORE)
    if score == 1.0:
        return [_all_match_sentence(report, total)]
    ref = metrics["reference_digest"]
    out = [
        f"Reproducibility score {score:.1%}: {metrics['matching_runs']} of "
        f"{total} runs match the reference artifacts"
        + (f" (digest {ref[:12]}, run {metrics['reference_run']})." if ref else " (no complete, intact run).")
    ]
    by_name = {r.name: r for r in runs}
    for entry in report_get(report, layout.REPORT_DIVERGENCE) or []:
        run = by_name[entry["run"]]
        if run.status == STATUS_INCOMPLETE:
            out.append(f"Run {run.name} is incomplete ({run.status_reason}); it counts against the score.")
        elif run.status == STATUS_MISMATCH:
            out.extend(_integrity_sentences(run))
        else:
            out.append(_divergence_sentence(run, entry))
    out.extend(_attribution_sentences(report_get(report, layout.REPORT_CROSS_ENVIRONMENT)))
    return out


def load_report(path: Path) -> dict[str, Any]:
    """Read a report JSON (or a directory holding reproducibility_analysis_report.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / layout.REPORT_JSON
    if not path.is_file():
        raise QloraxError(
            f"{path}: no such report. Run `qlorax analyze` first, or pass the path of {layout.REPORT_JSON}."
        )
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise QloraxError(f"{path}: not a readable JSON report ({exc}).") from exc
    if not isinstance(data, dict):
        raise QloraxError(f"{path}: not a qlorax report (expected a JSON object).")
    return data
