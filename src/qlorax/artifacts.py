"""Run directories: atomic writes, the SHA-256 manifest, and integrity checks.

Every file a run writes goes through `write_bytes_atomic` (temp file, fsync, rename) so
that a crash never leaves a half-written file under its final name. The manifest
`artifact_summary.json` is written last: a directory without it is not a finished run.
This module is pure Python (no torch) so that analysis and checks start fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qlorax.layout import (
    CHECKPOINTS_DIR,
    DETERMINISTIC_FILES,
    EXPORT_FILES,
    HUB_HOUSEKEEPING_DIRS,
    HUB_HOUSEKEEPING_FILES,
    LOCK,
    MANIFEST,
    MANIFEST_FORMAT,
    MERGED_SHARD_PATTERN,
    PUBLICATION,
    PUBLICATION_FORMAT,
)

_CHUNK = 1 << 20


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def default_dir_mode() -> int:
    """The mode a directory made with mkdir would get (mkdtemp makes 0700 ones)."""
    return 0o777 & ~_UMASK


def sha256_file(path: Path) -> str:
    """Stream a file through SHA-256 (each file read once, in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """The one JSON form we hash: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def pretty_json(obj: Any) -> str:
    """Stable human-readable JSON (sorted keys, trailing newline) for artifacts."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def json_safe(obj: Any) -> Any:
    """Strict JSON for reports and logs: NaN/inf become strings, numpy scalars Python ones,
    paths strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and type(obj).__module__ == "numpy":
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def utc_now() -> str:
    """The one timestamp format of informational files and logs: ISO 8601, UTC, microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, pretty_json(obj))


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def classify(relative_path: str) -> str:
    """'deterministic' for files that must match across runs (a run's, or an export's), else
    'informational'."""
    name = relative_path.rsplit("/", 1)[-1]
    if "/" not in relative_path and (name in DETERMINISTIC_FILES or name in EXPORT_FILES
                                     or re.fullmatch(MERGED_SHARD_PATTERN, name)):
        return "deterministic"
    return "informational"


def _manifest_candidates(run_dir: Path) -> list[str]:
    """Files covered by the manifest: everything except the manifest, the lock,
    temp files and checkpoints (which carry manifests of their own)."""
    found = []
    for path in sorted(run_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(run_dir).as_posix()
        top = rel.split("/", 1)[0]
        if rel in (MANIFEST, LOCK) or top == CHECKPOINTS_DIR or path.name.endswith(".tmp"):
            continue
        found.append(rel)
    return found


def build_manifest(run_dir: Path, files: list[str] | None = None,
                   annotations: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file of a run directory into the manifest structure (plus `annotations`:
    top-level facts such as the run an export came from)."""
    run_dir = Path(run_dir)
    entries: dict[str, dict[str, Any]] = {}
    for rel in files if files is not None else _manifest_candidates(run_dir):
        path = run_dir / rel
        entries[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size, "kind": classify(rel)}
    deterministic = {k: v["sha256"] for k, v in entries.items() if v["kind"] == "deterministic"}
    return {
        "format": MANIFEST_FORMAT,
        "files": entries,
        "artifact_count": len(entries),
        # One digest for "the result": equal across runs exactly when every deterministic file is.
        "deterministic_digest": sha256_bytes(canonical_json(deterministic).encode()),
        **(annotations or {}),
    }


def write_manifest(run_dir: Path, annotations: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write artifact_summary.json last; its presence marks the run as finished."""
    manifest = build_manifest(run_dir, annotations=annotations)
    write_json_atomic(Path(run_dir) / MANIFEST, manifest)
    return manifest


def load_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a qlorax manifest (format {data.get('format')!r})")
    return data


@dataclass
class IntegrityReport:
    """What `qlorax check` found: files missing, added or altered against the manifest (and, for a
    published snapshot, the files its publication record withheld and what is wrong with the record)."""

    run_dir: str
    has_manifest: bool
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    altered: list[str] = field(default_factory=list)
    irregular: list[str] = field(default_factory=list)  # "path (symbolic link)", ...: tampering
    checked: int = 0
    published: bool = False
    withheld: list[str] = field(default_factory=list)
    publication_problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return self.has_manifest and not (self.missing or self.extra or self.altered or self.irregular
                                          or self.publication_problems)

    def to_dict(self) -> dict[str, Any]:
        result = {
            "run_dir": self.run_dir,
            "has_manifest": self.has_manifest,
            "intact": self.intact,
            "checked": self.checked,
            "missing": self.missing,
            "extra": self.extra,
            "altered": self.altered,
            "irregular": self.irregular,
        }
        if self.published:
            result.update(published=True, withheld=self.withheld, publication_problems=self.publication_problems)
        return result


def irregular_entries(run_dir: Path) -> list[str]:
    """Everything in a run directory that is not a regular file or a real directory inside it:
    symbolic links (to a file or a folder), hard links shared with another name, FIFOs,
    sockets, devices. A run's files must be its own: through a link, content that passed a
    check can be changed later. Each entry is "relative/path (what it is)"."""
    found = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            try:
                info = path.lstat()
            except OSError:
                continue
            rel = path.relative_to(run_dir).as_posix()
            if stat.S_ISLNK(info.st_mode):
                found.append(f"{rel} (symbolic link)")
            elif stat.S_ISDIR(info.st_mode):
                continue
            elif not stat.S_ISREG(info.st_mode):
                found.append(f"{rel} (not a regular file)")
            elif info.st_nlink > 1 and rel != LOCK:
                found.append(f"{rel} (hard link: {info.st_nlink} names)")
    return sorted(found)


def check_run_dir(run_dir: Path) -> IntegrityReport:
    """Re-hash every file against the manifest and list what does not match; links and other
    non-regular entries are reported as tampering (`irregular`), the manifest included.

    A published snapshot (one holding PUBLICATION) is a run directory by other rules: the
    informational files its record withheld may be absent, the files it added (card, report)
    must match the record's digests, and hub housekeeping files are ignored."""
    run_dir = Path(run_dir)
    report = IntegrityReport(run_dir=str(run_dir), has_manifest=False)
    if not (run_dir / MANIFEST).is_file() and not (run_dir / MANIFEST).is_symlink():
        return report
    report.has_manifest = True
    report.irregular = irregular_entries(run_dir)
    if any(entry.startswith(f"{MANIFEST} (") for entry in report.irregular):
        return report  # a manifest that is not the run's own file is not read
    manifest = load_manifest(run_dir)
    if manifest is None:
        report.has_manifest = False
        return report
    listed = manifest.get("files", {})
    present = set(_manifest_candidates(run_dir))
    withheld: set[str] = set()
    added: dict[str, str] = {}
    if (run_dir / PUBLICATION).is_file():
        report.published = True
        withheld, added = _publication_rules(run_dir, listed, report.publication_problems)
        present = {rel for rel in present if not _hub_housekeeping(rel)} - {PUBLICATION}
    for rel in sorted({*listed, *added}):
        path = run_dir / rel
        if not path.is_file():
            if rel in withheld:
                report.withheld.append(rel)
            else:
                report.missing.append(rel)
            continue
        if path.is_symlink():
            continue  # reported as irregular; its target is not the run's file
        report.checked += 1
        if rel in added:  # the record gives a digest only
            differs = sha256_file(path) != added[rel]
        else:
            entry = listed[rel]
            differs = path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256")
        if differs:
            report.altered.append(rel)
    report.extra = sorted(present - set(listed) - set(added))
    return report


def _hub_housekeeping(rel: str) -> bool:
    return rel in HUB_HOUSEKEEPING_FILES or rel.split("/", 1)[0] in HUB_HOUSEKEEPING_DIRS


def _publication_rules(run_dir: Path, listed: dict[str, Any], problems: list[str]) -> tuple[set[str], dict[str, str]]:
    """(withheld run files, added files {path: sha256}) from a snapshot's publication record; what
    is wrong with the record goes to `problems` (a record may withhold only informational files)."""
    try:
        record = read_json(run_dir / PUBLICATION)
    except (OSError, ValueError) as exc:
        problems.append(f"{PUBLICATION}: unreadable ({exc.__class__.__name__})")
        return set(), {}
    if not isinstance(record, dict) or record.get("format") != PUBLICATION_FORMAT:
        problems.append(f"{PUBLICATION}: not a qlorax publication record (format {PUBLICATION_FORMAT} expected)")
        return set(), {}
    manifest_digest = sha256_file(run_dir / MANIFEST)
    if record.get("manifest_sha256") != manifest_digest:
        problems.append(f"{PUBLICATION}: it was written for manifest {str(record.get('manifest_sha256'))[:16]}…, "
                        f"but this snapshot's {MANIFEST} is {manifest_digest[:16]}…")
    withheld = set()
    for rel in sorted(record.get("withheld") or {}):
        if rel not in listed or classify(rel) != "informational":
            problems.append(f"{PUBLICATION}: withholds {rel!r}, which is not an informational file of the run")
        else:
            withheld.add(rel)
    added = record.get("added") or {}
    if not isinstance(added, dict) or not all(isinstance(v, str) for v in added.values()):
        problems.append(f"{PUBLICATION}: 'added' must map file names to sha256 digests")
        return withheld, {}
    clashes = sorted(set(added) & set(listed))
    if clashes:
        problems.append(f"{PUBLICATION}: adds {', '.join(clashes)}, which the run's manifest already lists")
    return withheld, {rel: digest for rel, digest in added.items() if rel not in listed}
