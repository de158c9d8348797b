"""Run directories: finding them, and the verified facts about each one.

A run's deterministic artifacts count only when its manifest verifies: every file is hashed
once, by streaming (`check_run_dir`), and the manifest's own fields are checked against its
entries so that a flipped byte in the manifest cannot pass either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlorax import layout
from qlorax.artifacts import (
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

STATUS_OK = "ok"
STATUS_INCOMPLETE = "incomplete"
STATUS_MISMATCH = "manifest_mismatch"


# --------------------------------------------------------------------------- discovery


def is_run_dir(path: Path) -> bool:
    """A run directory holds at least one of the files only `qlorax train` writes."""
    return any((Path(path) / marker).is_file() for marker in layout.RUN_MARKERS)


def _runs_below(root: Path) -> set[Path]:
    """Run directories under a folder that is not one; a run is a leaf, checkpoints are skipped."""
    here: set[Path] = set()
    for dirpath, dirnames, _files in os.walk(root):
        current = Path(dirpath)
        if current != root and is_run_dir(current):
            here.add(current)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d != layout.CHECKPOINTS_DIR and not d.startswith("."))
    return here


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
                f"holding {layout.MANIFEST}) or a folder that contains run directories."
            )
        if not path.is_dir():
            raise QloraxError(
                f"{path}: not a directory. Pass a run directory or a folder of run directories."
            )
        root = path.resolve()
        if is_run_dir(root):
            found.add(root)
            continue
        here = _runs_below(root)
        if not here:
            markers = f"{', '.join(layout.RUN_MARKERS[:-1])} or {layout.RUN_MARKERS[-1]}"
            raise QloraxError(
                f"{path}: no run directories found in it (a run directory holds {markers}). "
                "Check the path, or train first."
            )
        found |= here
    return sorted(found)


# --------------------------------------------------------------------------- per-run facts


@dataclass
class RunFacts:
    """What analysis knows about one run directory, read once."""

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
    exit_code: int | None = None  # its training process's, when a verification analyses its own runs


def _read_dict_or_none(path: Path) -> dict[str, Any] | None:
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """Internal consistency of a manifest: a flipped byte in it must not pass unnoticed.

    `check_run_dir` verifies the files against the manifest; this verifies the manifest's own
    fields (kinds, count, deterministic digest) against its file entries.
    """
    name = layout.MANIFEST
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{name}: 'files' is missing or not a mapping"]
    problems: list[str] = []
    deterministic: dict[str, str] = {}
    for rel, entry in sorted(files.items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            problems.append(f"{name}: entry {rel!r} has no sha256")
            continue
        if entry.get("kind") != classify(rel):
            problems.append(f"{name}: entry {rel!r} has kind {entry.get('kind')!r}, expected {classify(rel)!r}")
        if classify(rel) == "deterministic":
            deterministic[rel] = entry["sha256"]
    if manifest.get("artifact_count") != len(files):
        problems.append(f"{name}: artifact_count {manifest.get('artifact_count')!r} but "
                        f"{len(files)} files listed")
    if manifest.get("deterministic_digest") != _deterministic_digest(deterministic):
        problems.append(f"{name}: deterministic_digest does not match its file entries")
    return problems


def _verify(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(integrity dict, parsed manifest or None); a broken manifest is a finding, not an exception."""
    try:
        report = check_run_dir(run_dir).to_dict()
        own_manifest = report["has_manifest"] and not (run_dir / layout.MANIFEST).is_symlink()
        manifest = load_manifest(run_dir) if own_manifest else None
    except (OSError, ValueError) as exc:  # unreadable or not-a-manifest artifact_summary.json
        report = IntegrityReport(run_dir=str(run_dir), has_manifest=True).to_dict()
        report["manifest_errors"] = [f"{layout.MANIFEST}: unreadable ({exc})"]
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


def _file_digests(run: RunFacts) -> dict[str, str]:
    """Digests of the run's deterministic files, trusting the manifest only where it verified."""
    listed = {}
    if run.manifest is not None and isinstance(run.manifest.get("files"), dict):
        listed = {rel: e.get("sha256") for rel, e in run.manifest["files"].items()
                  if isinstance(e, dict) and classify(rel) == "deterministic"}
    if run.integrity["intact"]:
        # Verified: the manifest's digests are the files' digests; no second read.
        return dict(listed)
    digests = {}
    altered = set(run.integrity["altered"])
    present = {rel for rel in layout.DETERMINISTIC_FILES if (run.path / rel).is_file()} | {
        rel for rel in listed if (run.path / rel).is_file()}
    for rel in sorted(present):
        if rel in listed and rel not in altered and run.integrity["has_manifest"] and listed[rel]:
            digests[rel] = listed[rel]
        else:
            digests[rel] = sha256_file(run.path / rel)
    return digests


def _status(run: RunFacts) -> tuple[str, str]:
    """(status, reason): a run counts only when finished, intact and marked complete."""
    status = (run.metadata or {}).get("status")
    if not run.integrity["has_manifest"]:
        return STATUS_INCOMPLETE, f"no {layout.MANIFEST}: the run did not finish"
    if not run.integrity["intact"]:
        return STATUS_MISMATCH, _integrity_reason(run.integrity)
    if status != "complete":
        shown = "missing" if run.metadata is None else repr(status)
        return STATUS_INCOMPLETE, f"{layout.METADATA} status is {shown}"
    return STATUS_OK, ""


def load_run(path: Path, name: str, exit_code: int | None = None) -> RunFacts:
    """Read and verify one run directory; never raises for a broken or unfinished run."""
    run = RunFacts(path=path, name=name, exit_code=exit_code)
    run.metadata = _read_dict_or_none(path / layout.METADATA)
    run.env = _read_dict_or_none(path / layout.ENV)
    run.results = _read_dict_or_none(path / layout.RESULTS)
    run.integrity, run.manifest = _verify(path)
    run.file_digests = _file_digests(run)
    run.deterministic_digest = _deterministic_digest(run.file_digests) if run.file_digests else None
    run.status, run.status_reason = _status(run)
    return run


def failed_run(path: Path, name: str, exit_code: int) -> RunFacts:
    """A run whose training process failed in this verification: it counts against the score and
    its directory is never read (it may hold another process's run, e.g. a concurrent one)."""
    integrity = {**IntegrityReport(run_dir=str(path), has_manifest=False).to_dict(), "manifest_errors": []}
    return RunFacts(path=path, name=name, integrity=integrity, status=STATUS_INCOMPLETE, exit_code=exit_code,
                    status_reason=f"its training process exited with code {exit_code} in this verification "
                                  "(its log says why); its directory was not analysed")


def integrity_problems(integrity: dict[str, Any]) -> list[str]:
    """What a `verify_run_dir` result found, one phrase per kind ([] when intact)."""
    if integrity.get("intact"):
        return []
    parts = []
    if integrity.get("irregular"):
        parts.append("not a regular file inside the run (tampering): " + ", ".join(integrity["irregular"]))
    if integrity.get("altered"):
        parts.append("altered: " + ", ".join(integrity["altered"]))
    if integrity.get("missing"):
        parts.append("missing: " + ", ".join(integrity["missing"]))
    if integrity.get("extra"):
        parts.append("not in manifest: " + ", ".join(integrity["extra"]))
    parts.extend(integrity.get("manifest_errors") or [])
    return parts or [f"no {layout.MANIFEST}" if not integrity.get("has_manifest") else "manifest does not match"]


def _integrity_reason(integrity: dict[str, Any]) -> str:
    return "; ".join(integrity_problems({**integrity, "intact": False}))


def run_names(paths: list[Path]) -> list[str]:
    """Names relative to the runs' common ancestor, so nested layouts stay unambiguous."""
    if len(paths) == 1:
        return [paths[0].name]
    common = Path(os.path.commonpath([str(p) for p in paths]))
    names = []
    for path in paths:
        rel = path.relative_to(common).as_posix()
        names.append(path.name if rel in ("", ".") else rel)
    return names


def display_path(path: Path) -> str:
    """The path relative to the working directory when it is below it, so reports stay short."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix() or "."
    except ValueError:
        return str(path)
