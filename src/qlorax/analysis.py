"""Compare run directories: which runs are bit-identical, where the others diverge, and why.

The proof of reproducibility is byte equality of the deterministic artifacts, checked through
the SHA-256 manifests; everything else here (trace divergence, tensor ULP distances,
environment grouping) explains a failure well enough to act on it. No torch: adapters are read
with `safetensors.numpy`, so analysis starts in a fraction of a second. Every file is hashed
once, by streaming (`check_run_dir`); adapters are loaded only for runs that differ.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qlorax import __version__
from qlorax.artifacts import (
    CHECKPOINTS_DIR,
    DETERMINISTIC_FILES,
    MANIFEST_NAME,
    IntegrityReport,
    canonical_json,
    check_run_dir,
    classify,
    load_manifest,
    read_json,
    sha256_bytes,
    sha256_file,
)
from qlorax.errors import QloraxError

REPORT_NAME = "reproducibility_analysis_report.json"
RUN_MARKERS = (MANIFEST_NAME, "results.json", "trace.jsonl", "training_metadata.json")
ADAPTER_FILE = "adapter_model.safetensors"
TRACE_FILE = "trace.jsonl"
# Compared per trace step, in this order: the first differing one is "the" divergent field.
TRACE_FIELDS = (
    ("loss", "loss_bits"),
    ("grad_norm", "grad_norm_bits"),
    ("lr", "lr"),
    ("tokens", "tokens"),
    ("lora_sha256", "lora_sha256"),
)
STATUS_OK = "ok"
STATUS_INCOMPLETE = "incomplete"
STATUS_MISMATCH = "manifest_mismatch"


# --------------------------------------------------------------------------- discovery


def is_run_dir(path: Path) -> bool:
    """A run directory holds at least one of the files only `qlorax train` writes."""
    return any((Path(path) / marker).is_file() for marker in RUN_MARKERS)


def discover_runs(paths: list[Path]) -> list[Path]:
    """Resolve run directories from paths that are runs or folders of runs (any depth).

    Checkpoint subtrees and hidden folders are skipped, and a run directory is a leaf: its
    insides are never searched for more runs. Returns absolute, sorted, de-duplicated paths.
    """
    if not paths:
        raise QloraxError("no run directories given: pass one or more run directories or folders of runs.")
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise QloraxError(
                f"{path}: no such directory. Pass a run directory (one written by `qlorax train`, "
                f"holding {MANIFEST_NAME}) or a folder that contains run directories."
            )
        if not path.is_dir():
            raise QloraxError(
                f"{path}: not a directory. Pass a run directory or a folder of run directories."
            )
        root = path.resolve()
        if is_run_dir(root):
            found.add(root)
            continue
        here: set[Path] = set()
        for dirpath, dirnames, _files in os.walk(root):
            current = Path(dirpath)
            if current != root and is_run_dir(current):
                here.add(current)
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if d != CHECKPOINTS_DIR and not d.startswith("."))
        found |= here
        if not here:
            raise QloraxError(
                f"{path}: no run directories found in it (a run directory holds {MANIFEST_NAME}, "
                "results.json, trace.jsonl or training_metadata.json). Check the path, or train first."
            )
    return sorted(found)


# --------------------------------------------------------------------------- per-run facts


@dataclass
class _Run:
    path: Path
    name: str
    manifest: dict[str, Any] | None = None
    integrity: dict[str, Any] = field(default_factory=dict)
    status: str = STATUS_OK
    status_reason: str = ""
    file_digests: dict[str, str] = field(default_factory=dict)
    deterministic_digest: str | None = None
    env: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    results: dict[str, Any] | None = None


def _read_json_or_none(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _as_dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """Internal consistency of a manifest: a flipped byte in it must not pass unnoticed.

    `check_run_dir` verifies the files against the manifest; this verifies the manifest's own
    fields (kinds, count, deterministic digest) against its file entries.
    """
    problems: list[str] = []
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{MANIFEST_NAME}: 'files' is missing or not a mapping"]
    deterministic: dict[str, str] = {}
    for rel, entry in sorted(files.items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            problems.append(f"{MANIFEST_NAME}: entry {rel!r} has no sha256")
            continue
        if entry.get("kind") != classify(rel):
            problems.append(f"{MANIFEST_NAME}: entry {rel!r} has kind {entry.get('kind')!r}, expected "
                            f"{classify(rel)!r}")
        if classify(rel) == "deterministic":
            deterministic[rel] = entry["sha256"]
    if manifest.get("artifact_count") != len(files):
        problems.append(f"{MANIFEST_NAME}: artifact_count {manifest.get('artifact_count')!r} but "
                        f"{len(files)} files listed")
    expected = sha256_bytes(canonical_json(deterministic).encode())
    if manifest.get("deterministic_digest") != expected:
        problems.append(f"{MANIFEST_NAME}: deterministic_digest does not match its file entries")
    return problems


def _verify(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(integrity dict, parsed manifest or None); a broken manifest is a finding, not an exception."""
    try:
        report = check_run_dir(run_dir).to_dict()
        manifest = load_manifest(run_dir) if report["has_manifest"] else None
    except (OSError, ValueError) as exc:  # unreadable or not-a-manifest artifact_summary.json
        report = IntegrityReport(run_dir=str(run_dir), has_manifest=True).to_dict()
        report["manifest_errors"] = [f"{MANIFEST_NAME}: unreadable ({exc})"]
        report["intact"] = False
        return report, None
    report["manifest_errors"] = manifest_problems(manifest) if manifest is not None else []
    report["intact"] = bool(report["intact"]) and not report["manifest_errors"]
    return report, manifest


def verify_run_dir(run_dir: Path) -> dict[str, Any]:
    """`check_run_dir` plus the manifest's self-consistency; never raises for a broken manifest.

    The result is `IntegrityReport.to_dict()` with `manifest_errors` added and `intact`
    false when there is any.
    """
    return _verify(Path(run_dir))[0]


def _deterministic_digest(file_digests: dict[str, str]) -> str:
    """The manifest's formula: sha256 of the canonical JSON {relpath: sha256}."""
    return sha256_bytes(canonical_json(file_digests).encode())


def _load_run(path: Path, name: str) -> _Run:
    run = _Run(path=path, name=name)
    run.metadata = _as_dict(_read_json_or_none(path / "training_metadata.json"))
    run.env = _as_dict(_read_json_or_none(path / "env.json"))
    run.results = _as_dict(_read_json_or_none(path / "results.json"))
    run.integrity, run.manifest = _verify(path)

    listed = {}
    if run.manifest is not None and isinstance(run.manifest.get("files"), dict):
        listed = {rel: e.get("sha256") for rel, e in run.manifest["files"].items()
                  if isinstance(e, dict) and classify(rel) == "deterministic"}
    if run.integrity["intact"]:
        # Verified: the manifest's digests are the files' digests; no second read.
        run.file_digests = dict(listed)
    else:
        altered = set(run.integrity["altered"])
        present = {rel for rel in DETERMINISTIC_FILES if (path / rel).is_file()} | {
            rel for rel in listed if (path / rel).is_file()}
        for rel in sorted(present):
            if rel in listed and rel not in altered and run.integrity["has_manifest"] and listed[rel]:
                run.file_digests[rel] = listed[rel]
            else:
                run.file_digests[rel] = sha256_file(path / rel)
    run.deterministic_digest = _deterministic_digest(run.file_digests) if run.file_digests else None

    status = (run.metadata or {}).get("status")
    if not run.integrity["has_manifest"]:
        run.status, run.status_reason = STATUS_INCOMPLETE, f"no {MANIFEST_NAME}: the run did not finish"
    elif not run.integrity["intact"]:
        run.status, run.status_reason = STATUS_MISMATCH, _integrity_reason(run.integrity)
    elif status != "complete":
        shown = "missing" if run.metadata is None else repr(status)
        run.status, run.status_reason = STATUS_INCOMPLETE, f"training_metadata.json status is {shown}"
    else:
        run.status, run.status_reason = STATUS_OK, ""
    return run


def _integrity_reason(integrity: dict[str, Any]) -> str:
    parts = []
    if integrity.get("altered"):
        parts.append("altered: " + ", ".join(integrity["altered"]))
    if integrity.get("missing"):
        parts.append("missing: " + ", ".join(integrity["missing"]))
    if integrity.get("extra"):
        parts.append("not in manifest: " + ", ".join(integrity["extra"]))
    parts.extend(integrity.get("manifest_errors") or [])
    return "; ".join(parts) or "manifest does not match"


def _run_names(paths: list[Path]) -> list[str]:
    """Names relative to the runs' common ancestor, so nested layouts stay unambiguous."""
    if len(paths) == 1:
        return [paths[0].name]
    common = Path(os.path.commonpath([str(p) for p in paths]))
    names = []
    for path in paths:
        rel = path.relative_to(common).as_posix()
        names.append(path.name if rel in ("", ".") else rel)
    return names


def _display_path(path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix() or "."
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- traces


def read_trace(path: Path) -> list[dict[str, Any]] | None:
    """The per-step records of trace.jsonl, or None when the file is missing or malformed."""
    try:
        with open(path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError):
        return None
    return [r for r in records if isinstance(r, dict)]


def _trace_value(record: dict[str, Any], name: str, key: str) -> Any:
    if key in record:
        return record[key]
    if name in record and key.endswith("_bits"):
        try:
            return float.hex(float(record[name]))
        except (TypeError, ValueError):
            return record[name]
    return record.get(name)


def _step_values(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    keys = ("step", "loss", "loss_bits", "grad_norm", "grad_norm_bits", "lr", "tokens", "lora_sha256")
    return {k: record[k] for k in keys if k in record}


def _step_of(record: dict[str, Any], index: int) -> int:
    step = record.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else index + 1


def compare_traces(reference: list[dict[str, Any]], run: list[dict[str, Any]]) -> dict[str, Any]:
    """First step where the traces differ, and which field differed first at that step.

    Fields are compared exactly (loss and grad norm through their float.hex bits) in the
    order loss, grad_norm, lr, tokens, lora_sha256; a trace that ends early diverges at the
    first step it lacks ("trace_length").
    """
    ref_by = {_step_of(r, i): r for i, r in enumerate(reference)}
    run_by = {_step_of(r, i): r for i, r in enumerate(run)}
    for step in sorted(set(ref_by) | set(run_by)):
        a, b = ref_by.get(step), run_by.get(step)
        if a is None or b is None:
            shorter = "run" if b is None else "reference"
            return {
                "first_divergent_step": step,
                "first_divergent_field": "trace_length",
                "differing_fields": ["trace_length"],
                "reference_values": _step_values(a),
                "run_values": _step_values(b),
                "note": f"the {shorter} trace has no step {step}",
            }
        differing = [name for name, key in TRACE_FIELDS
                     if _trace_value(a, name, key) != _trace_value(b, name, key)]
        if differing:
            return {
                "first_divergent_step": step,
                "first_divergent_field": differing[0],
                "differing_fields": differing,
                "reference_values": _step_values(a),
                "run_values": _step_values(b),
            }
    return {"first_divergent_step": None, "first_divergent_field": None, "differing_fields": [],
            "reference_values": None, "run_values": None}


# --------------------------------------------------------------------------- tensors


def _ordered_bits(array: np.ndarray) -> np.ndarray | None:
    """Integers that are ordered like the floats, so that their difference counts ULPs.

    float32/float16: view as signed int and turn sign-magnitude into two's complement
    (negative i -> INT_MIN - i), computed in int64 so nothing overflows. float64: the same
    order as unsigned offsets.
    """
    if array.dtype == np.float32 or array.dtype == np.float16:
        width = 32 if array.dtype == np.float32 else 16
        signed = array.view(np.int32 if width == 32 else np.int16).astype(np.int64)
        return np.where(signed < 0, np.int64(-(2 ** (width - 1))) - signed, signed)
    if array.dtype == np.float64:
        raw = array.view(np.uint64)
        sign = np.uint64(1 << 63)
        return np.where(raw & sign, ~raw, raw | sign)
    return None


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise distance in units in the last place (+0 and -0 are 0 apart)."""
    oa, ob = _ordered_bits(np.ascontiguousarray(a)), _ordered_bits(np.ascontiguousarray(b))
    if oa is None or ob is None:
        return np.abs(a.astype(np.float64) - b.astype(np.float64))
    if oa.dtype == np.uint64:
        return np.where(oa > ob, oa - ob, ob - oa)
    return np.abs(oa - ob)


def _tensor_diff(name: str, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Stats for two same-shape, same-dtype tensors whose bytes differ (so size > 0)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    abs_diff = np.abs(a64 - b64)
    denom = np.maximum(np.abs(a64), np.abs(b64))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(denom > 0, abs_diff / np.where(denom > 0, denom, 1.0), 0.0)
    bits_differ = a.view(np.uint8).reshape(a.size, -1) != b.view(np.uint8).reshape(b.size, -1)
    return {
        "name": name,
        "shape": list(a.shape),
        "dtype": str(a.dtype),
        "numel": int(a.size),
        "differing_elements": int(np.count_nonzero(np.any(bits_differ, axis=1))),
        "max_abs_diff": float(np.max(abs_diff)),
        "max_rel_diff": float(np.max(rel)),
        "max_ulp_distance": int(np.max(ulp_distance(a, b))),
    }


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def compare_adapters(
    reference: dict[str, np.ndarray] | Path, run: dict[str, np.ndarray] | Path
) -> dict[str, Any]:
    """Which tensors differ between two adapters, how much (abs, rel, ULP), sorted by name.

    Tensors present on one side only are listed with `missing_in`; a shape mismatch is flagged
    per tensor and in `shapes_differ`.
    """
    ref = reference if isinstance(reference, dict) else _load_tensors(Path(reference))
    other = run if isinstance(run, dict) else _load_tensors(Path(run))
    tensors: list[dict[str, Any]] = []
    shapes_differ = False
    names = sorted(set(ref) | set(other))
    compared = len(names)  # tensors present on either side; a missing one counts as differing
    for name in names:
        if name not in other:
            tensors.append({"name": name, "missing_in": "run", "shape": list(ref[name].shape)})
            continue
        if name not in ref:
            tensors.append({"name": name, "missing_in": "reference", "shape": list(other[name].shape)})
            continue
        a, b = ref[name], other[name]
        if a.shape != b.shape:
            shapes_differ = True
            tensors.append({"name": name, "shape_mismatch": True, "shape_reference": list(a.shape),
                            "shape_run": list(b.shape)})
        elif a.dtype != b.dtype:
            tensors.append({"name": name, "dtype_mismatch": True, "dtype_reference": str(a.dtype),
                            "dtype_run": str(b.dtype), "shape": list(a.shape)})
        elif a.tobytes() != b.tobytes():
            tensors.append(_tensor_diff(name, a, b))
    return {"tensors": tensors, "tensors_compared": compared, "tensors_differing": len(tensors),
            "shapes_differ": shapes_differ}


# --------------------------------------------------------------------------- environment


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def is_thread_key(key: str) -> bool:
    """Fingerprint keys that only record the thread count (thread invariance is promised)."""
    last = key.rsplit(".", 1)[-1].lower()
    return last == "threads" or last.endswith("num_threads")


def _env_info(run: _Run) -> dict[str, Any]:
    env = run.env or {}
    fingerprint = env.get("fingerprint") if isinstance(env.get("fingerprint"), dict) else {}
    return {
        "fingerprint_sha256": env.get("fingerprint_sha256"),
        "fingerprint": fingerprint,
        "environment": env.get("environment", fingerprint.get("environment")),
        "profile": env.get("profile", fingerprint.get("profile")),
        "threads": env.get("threads", fingerprint.get("threads")),
        "torch": fingerprint.get("torch"),
    }


def _inputs_key(run: _Run) -> str:
    """What a run was asked to compute: its config hash and data digest (from results.json)."""
    results = run.results or {}
    data = results.get("data") if isinstance(results.get("data"), dict) else {}
    return f"{results.get('config_hash')}:{data.get('sha256')}"


def _cross_environment(runs: list[_Run]) -> dict[str, Any]:
    infos = {r.name: _env_info(r) for r in runs}
    group_runs: dict[str, list[_Run]] = {}
    for run in runs:
        key = infos[run.name]["fingerprint_sha256"] or "unknown"
        group_runs.setdefault(key, []).append(run)

    groups = []
    labels = Counter()
    for key, members in group_runs.items():
        info = infos[members[0].name]
        if key == "unknown":
            label = "unknown environment (no env.json)"
        else:
            threads = f"{info['threads']} thread{'' if info['threads'] == 1 else 's'}"
            label = f"{info['environment']} / {info['profile']} / {threads} / torch {info['torch']}"
        labels[label] += 1
        ok_digests = sorted({r.deterministic_digest for r in members if r.status == STATUS_OK})
        groups.append({
            "label": label,
            "fingerprint_sha256": None if key == "unknown" else key,
            "fingerprint": info["fingerprint"] if key != "unknown" else None,
            "runs": [r.name for r in members],
            "complete_runs": [r.name for r in members if r.status == STATUS_OK],
            "distinct_digests": len(ok_digests),
            "digests": ok_digests,
            "agreement_within": len(ok_digests) <= 1,
        })
    for group in groups:  # two fingerprints with one label: keep labels unique
        if labels[group["label"]] > 1 and group["fingerprint_sha256"]:
            group["label"] += f" [{group['fingerprint_sha256'][:8]}]"
    groups.sort(key=lambda g: (g["label"], g["runs"]))

    flats = [_flatten(g["fingerprint"]) for g in groups if g["fingerprint"] is not None]
    all_keys = sorted(set().union(*flats)) if flats else []
    differing = [k for k in all_keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]

    ok = [r for r in runs if r.status == STATUS_OK]
    ok_digests = {r.deterministic_digest for r in ok}
    # Classes of environments that differ at most in thread count.
    classes: dict[str, set[str | None]] = {}
    for run in ok:
        fp = infos[run.name]["fingerprint"] if infos[run.name]["fingerprint_sha256"] else None
        key = ("unknown:" + run.name) if fp is None else canonical_json(
            {k: v for k, v in _flatten(fp).items() if not is_thread_key(k)})
        classes.setdefault(key, set()).add(run.deterministic_digest)
    inputs = {run.name: _inputs_key(run) for run in ok}
    same_inputs_agree = all(
        len({r.deterministic_digest for r in ok if inputs[r.name] == key}) <= 1 for key in set(inputs.values())
    )
    if ok and len(ok) == len(runs) and len(ok_digests) == 1:
        attribution = "none"
    elif len(ok_digests) <= 1:
        attribution = "run_integrity"
    elif len(set(inputs.values())) > 1 and same_inputs_agree:
        # The runs were given different inputs (config or data): neither drift nor nondeterminism.
        attribution = "input_difference"
    elif any(not g["agreement_within"] for g in groups):
        attribution = "nondeterminism"
    elif any(len(d) > 1 for d in classes.values()):
        attribution = "nondeterminism"
    else:
        attribution = "environment_drift"
    return {
        "groups": groups,
        "agreement_across_groups": len(ok_digests) <= 1,
        "differing_fingerprint_keys": differing,
        "drift_keys": [k for k in differing if not is_thread_key(k)],
        "attribution": attribution,
    }


# --------------------------------------------------------------------------- report


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _metric_stats(ok: list[_Run]) -> dict[str, Any]:
    with_results = [r for r in ok if r.results is not None]
    keys = sorted({k for r in with_results for k, v in r.results.items() if _is_number(v)})
    stats: dict[str, Any] = {}
    for key in keys:
        values = [r.results[key] for r in with_results if _is_number(r.results.get(key))]
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


def _json_safe(obj: Any) -> Any:
    """The report must be strict JSON: NaN/inf become strings, numpy scalars Python ones."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _fmt_float(value: Any) -> str:
    """Shortest round-trip repr, so two floats one ULP apart never print the same."""
    return repr(value) if _is_number(value) else str(value)


def analyze_runs(run_dirs: list[Path]) -> dict[str, Any]:
    """Compare run directories and build the reproducibility report (see docs for the keys).

    reproducibility_score is the share of ALL runs whose verified deterministic artifacts
    equal the most common set; incomplete and tampered runs count in the denominator and
    never match, so 1.0 means every run is complete, intact and bit-identical.
    """
    paths = [Path(p).resolve() for p in run_dirs]
    if not paths:
        raise QloraxError("no run directories to analyze.")
    runs = [_load_run(p, n) for p, n in zip(paths, _run_names(paths), strict=True)]
    ok = [r for r in runs if r.status == STATUS_OK]

    # Reference: the most common digest among verified runs; ties go to the earliest run.
    counts = Counter(r.deterministic_digest for r in ok)
    first_index = {}
    for i, r in enumerate(ok):
        first_index.setdefault(r.deterministic_digest, i)
    reference_digest = max(counts, key=lambda d: (counts[d], -first_index[d])) if counts else None
    reference = next((r for r in ok if r.deterministic_digest == reference_digest), None)
    matching = [r for r in ok if r.deterministic_digest == reference_digest]
    score = len(matching) / len(runs)

    cross = _cross_environment(runs)
    divergence = _divergence(runs, reference, matching) if len(matching) != len(runs) else None
    agreement = _artifact_agreement(runs, reference)

    run_entries = []
    for run in runs:
        info = _env_info(run)
        manifest = run.manifest or {}
        run_entries.append({
            "name": run.name,
            "path": _display_path(run.path),
            "status": run.status,
            "status_reason": run.status_reason,
            "deterministic_digest": run.deterministic_digest,
            "matches_reference": run in matching,
            "environment_fingerprint_sha256": info["fingerprint_sha256"],
            "threads": info["threads"],
            "profile": info["profile"],
            "environment": info["environment"],
            "artifact_count": manifest.get("artifact_count"),
            "duration_seconds": (run.metadata or {}).get("duration_seconds"),
            "peak_memory_mb": (run.metadata or {}).get("peak_memory_mb"),
            "integrity": run.integrity,
        })

    metas = [r.metadata or {} for r in runs]
    durations = [m["duration_seconds"] for m in metas if _is_number(m.get("duration_seconds"))]
    memory = [m["peak_memory_mb"] for m in metas if _is_number(m.get("peak_memory_mb"))]
    counts_complete = [len(r.manifest["files"]) for r in runs if r.status != STATUS_INCOMPLETE
                       and r.manifest is not None and isinstance(r.manifest.get("files"), dict)]
    report = {
        "analysis_metadata": {
            "total_runs_analyzed": len(runs),
            "complete_runs": len(ok),
            "incomplete_runs": sum(r.status == STATUS_INCOMPLETE for r in runs),
            "tampered_runs": sum(r.status == STATUS_MISMATCH for r in runs),
            "qlorax_version": __version__,
            "run_dirs": [_display_path(p) for p in paths],
        },
        "overall_analysis": {
            "metrics_reproducibility": {
                "reproducibility_score": score,
                "reference_digest": reference_digest,
                "reference_run": reference.name if reference else None,
                "matching_runs": len(matching),
                "matching_run_names": [r.name for r in matching],
                "per_metric": _metric_stats(ok),
            },
            "artifact_agreement": agreement,
        },
        "runs": run_entries,
        "divergence": divergence,
        "cross_environment_analysis": cross,
        "summary": {
            "reproducibility_score": score,
            "training_duration": max(durations) if durations else None,
            "peak_memory_mb": max(memory) if memory else None,
            "artifact_count": min(counts_complete) if counts_complete else None,
            "total_runs": len(runs),
            "matching_runs": len(matching),
            "attribution": cross["attribution"],
        },
    }
    report["conclusions"] = _conclusions(report, runs)
    return _json_safe(report)


def _artifact_agreement(runs: list[_Run], reference: _Run | None) -> dict[str, Any]:
    names = sorted(set(DETERMINISTIC_FILES) | {rel for r in runs for rel in r.file_digests})
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


def _divergence(runs: list[_Run], reference: _Run | None, matching: list[_Run]) -> list[dict[str, Any]]:
    entries = []
    ref_trace = read_trace(reference.path / TRACE_FILE) if reference else None
    ref_tensors: dict[str, np.ndarray] | None = None
    ref_tensor_error = None
    for run in runs:
        if run in matching:
            continue
        entry: dict[str, Any] = {"run": run.name, "status": run.status, "reason": run.status_reason or (
            "deterministic artifacts differ from the reference")}
        if reference is None:
            entry["note"] = "no complete, intact run to compare against"
            entries.append(entry)
            continue
        entry["reference_run"] = reference.name
        entry["differing_files"] = sorted(
            rel for rel in set(reference.file_digests) | set(run.file_digests)
            if reference.file_digests.get(rel) != run.file_digests.get(rel))
        trace = read_trace(run.path / TRACE_FILE)
        if ref_trace is None or trace is None:
            entry.update({"first_divergent_step": None, "first_divergent_field": None,
                          "note": f"{TRACE_FILE} missing or unreadable in the "
                                  f"{'reference' if ref_trace is None else 'run'}"})
        else:
            entry.update(compare_traces(ref_trace, trace))
        entry["tensors"] = []
        if ADAPTER_FILE in entry["differing_files"]:
            if not (run.path / ADAPTER_FILE).is_file():
                entry["tensor_error"] = f"{ADAPTER_FILE} is missing in the run"
            else:
                try:
                    if ref_tensors is None and ref_tensor_error is None:
                        ref_tensors = _load_tensors(reference.path / ADAPTER_FILE)
                    if ref_tensors is None:
                        raise ValueError(ref_tensor_error)
                    entry.update(compare_adapters(ref_tensors, run.path / ADAPTER_FILE))
                except Exception as exc:  # a corrupt safetensors header is a finding, not a crash
                    if ref_tensors is None:
                        ref_tensor_error = ref_tensor_error or str(exc)
                    entry["tensor_error"] = f"cannot compare {ADAPTER_FILE}: {exc}"
        entries.append(entry)
    return entries


def _conclusions(report: dict[str, Any], runs: list[_Run]) -> list[str]:
    meta = report["analysis_metadata"]
    metrics = report["overall_analysis"]["metrics_reproducibility"]
    cross = report["cross_environment_analysis"]
    total = meta["total_runs_analyzed"]
    out = []
    threads = sorted({str(r["threads"]) for r in report["runs"] if r["threads"] is not None})
    envs = sorted({f"{r['environment']}/{r['profile']}" for r in report["runs"] if r["environment"]})
    if metrics["reproducibility_score"] == 1.0:
        where = []
        if len(threads) > 1:
            where.append(f"thread counts {', '.join(threads)}")
        if len(envs) > 1:
            where.append(f"environments {', '.join(envs)}")
        suffix = f" across {' and '.join(where)}" if where else ""
        noun = "run is" if total == 1 else f"{total} runs are"
        out.append(f"All {noun} bit-identical{suffix}." if total > 1 else f"The {noun} complete and intact.")
        return out
    ref = metrics["reference_digest"]
    out.append(
        f"Reproducibility score {metrics['reproducibility_score']:.1%}: {metrics['matching_runs']} of "
        f"{total} runs match the reference artifacts"
        + (f" (digest {ref[:12]}, run {metrics['reference_run']})." if ref else " (no complete, intact run).")
    )
    by_name = {r.name: r for r in runs}
    for entry in report["divergence"] or []:
        run = by_name[entry["run"]]
        if run.status == STATUS_INCOMPLETE:
            out.append(f"Run {run.name} is incomplete ({run.status_reason}); it counts against the score.")
            continue
        if run.status == STATUS_MISMATCH:
            integ = run.integrity
            for rel in integ["altered"]:
                out.append(f"Run {run.name}: {rel} does not match its manifest (altered after the run).")
            for rel in integ["missing"]:
                out.append(f"Run {run.name}: {rel} is listed in the manifest but missing.")
            for rel in integ["extra"]:
                out.append(f"Run {run.name}: {rel} is not in the manifest (added after the run).")
            for problem in integ.get("manifest_errors") or []:
                out.append(f"Run {run.name}: {problem}.")
            continue
        step = entry.get("first_divergent_step")
        fieldname = entry.get("first_divergent_field")
        if step is not None:
            a, b = entry.get("reference_values") or {}, entry.get("run_values") or {}
            detail = ""
            if fieldname in ("loss", "grad_norm", "lr", "tokens") and fieldname in a and fieldname in b:
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
            text += (f" {entry['tensors_differing']} of {entry['tensors_compared']} adapter tensors {verb}"
                     f"{extra}.")
            if entry.get("shapes_differ"):
                text += " Tensor shapes differ: the runs were not trained with the same config."
        out.append(text)
    attribution = cross["attribution"]
    if attribution == "environment_drift":
        keys = ", ".join(cross["drift_keys"]) or "the environment fingerprint"
        out.append(f"Differences follow the environment: each environment group agrees within itself, and "
                   f"the groups differ in {keys}. This is environment drift, not nondeterminism.")
    elif attribution == "nondeterminism":
        within = [g["label"] for g in cross["groups"] if not g["agreement_within"]]
        if within:
            out.append(f"Runs differ within one identical environment ({'; '.join(within)}): nondeterminism.")
        else:
            out.append("Runs differ across environments that differ only in thread count: the result depends "
                       "on the thread count (nondeterminism).")
    elif attribution == "run_integrity":
        out.append("All complete, intact runs agree; only incomplete or tampered runs differ.")
    elif attribution == "input_difference":
        out.append("The differing runs were given different inputs (config hash or data digest in results.json): "
                   "runs with the same inputs agree, so this is neither environment drift nor nondeterminism.")
    return out


def load_report(path: Path) -> dict[str, Any]:
    """Read a report JSON (or a directory holding reproducibility_analysis_report.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    if not path.is_file():
        raise QloraxError(
            f"{path}: no such report. Run `qlorax analyze` first, or pass the path of {REPORT_NAME}."
        )
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise QloraxError(f"{path}: not a readable JSON report ({exc}).") from exc
    if not isinstance(data, dict):
        raise QloraxError(f"{path}: not a qlorax report (expected a JSON object).")
    return data
