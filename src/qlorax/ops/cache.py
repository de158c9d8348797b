"""A content-addressed cache of finished runs: same inputs, same bits, so no need to train twice.

The key is the SHA-256 of everything that determines a run's deterministic files: the
resolved config's hash, every data file's digest, the base model's digest, the qlorax
version and the determinism profile. An entry is a plain copy of the run directory's
files (JSON, JSONL, safetensors, the manifest), never pickle: reading an entry executes
nothing, and every hit is re-hashed against its manifest before it is used.

Layout under the cache directory ($QLORAX_CACHE_DIR, default ~/.cache/qlorax/runs):

    entries/<key>/entry.json    key material, source, sizes; its mtime = last use
    entries/<key>/run/          the run's files and artifact_summary.json
    tmp/                        entries being written (renamed into entries/ when whole)
    .lock                       flock: shared for readers, exclusive for gc and removal
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qlorax import settings
from qlorax.artifacts import (
    canonical_json,
    check_run_dir,
    load_manifest,
    read_json,
    sha256_bytes,
    write_json_atomic,
)
from qlorax.errors import OutputError
from qlorax.layout import MANIFEST

KEY_FORMAT = "qlorax-cache-key/1"
ENTRY_FORMAT = "qlorax-cache-entry/1"
ENTRY_FILE = "entry.json"
RUN_SUBDIR = "run"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_STALE_TMP_SECONDS = 3600

log = logging.getLogger("qlorax.cache")


class CacheCorruptionWarning(UserWarning):
    """A cache entry no longer matches its manifest and was removed."""


class CacheKey(str):
    """A cache key (64 lower-case hex digits) that carries the material it was computed from.

    A key cannot be reversed, so whoever stores an entry needs the material too, to record in
    entry.json what `qlorax cache ls` shows (profile, config hash). Carrying it on the key
    itself keeps the two together from `key_for` to `store`, whichever CacheManager instance
    (or process) does each. It is a str, so it works wherever a key does."""

    material: dict[str, Any]

    def __new__(cls, digest: str, material: Mapping[str, Any]) -> CacheKey:
        key = super().__new__(cls, digest)
        key.material = dict(material)
        return key


def default_cache_dir() -> Path:
    """$QLORAX_CACHE_DIR, else $QLORAX_HOME/runs (~/.cache/qlorax/runs)."""
    return settings.run_cache_dir()


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"not a cache key (64 lower-case hex digits): {key!r}")
    return key


def _copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())


def _copy_file_atomic(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as dst, open(source, "rb") as src:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class CacheManager:
    """Store, find (re-verified) and restore finished runs by content key."""

    def __init__(self, cache_dir: Path | str | None = None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    # -- keys ---------------------------------------------------------------------------
    def key_for(
        self,
        config_hash: str,
        data_digests: Mapping[str, str],
        model_digest: str,
        version: str,
        profile: str,
    ) -> CacheKey:
        """SHA-256 of the canonical JSON of every input that determines the run's bits.

        `data_digests` maps a stable name of each data file to its SHA-256 (names, not
        absolute paths, so that the key does not depend on where the data lives). The key
        carries its material to `store` (see CacheKey)."""
        material = {
            "format": KEY_FORMAT,
            "config_hash": str(config_hash),
            "data": {str(k): str(v) for k, v in sorted(data_digests.items())},
            "model_digest": str(model_digest),
            "qlorax_version": str(version),
            "profile": str(profile),
        }
        return CacheKey(sha256_bytes(canonical_json(material).encode("utf-8")), material)

    # -- paths and locking --------------------------------------------------------------
    def _entry_dir(self, key: str) -> Path:
        return self.cache_dir / "entries" / _check_key(key)

    def _ensure_dirs(self) -> None:
        for sub in ("", "entries", "tmp"):
            (self.cache_dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        """Readers share the cache lock; gc and removal take it exclusively."""
        self._ensure_dirs()
        fd = os.open(self.cache_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _remove_dir(self, directory: Path) -> None:
        """Rename out of entries/ first (atomic: readers never see half an entry), then delete."""
        if not directory.exists():
            return
        self._ensure_dirs()
        trash = Path(tempfile.mkdtemp(prefix="trash-", dir=self.cache_dir / "tmp"))
        try:
            os.replace(directory, trash / directory.name)
        except OSError:
            shutil.rmtree(trash, ignore_errors=True)
            shutil.rmtree(directory, ignore_errors=True)
            return
        shutil.rmtree(trash, ignore_errors=True)

    # -- lookup / store / restore ---------------------------------------------------------
    def _verify_entry(self, key: str, entry_dir: Path) -> str | None:
        """None when the entry is intact, else what is wrong with it."""
        try:
            info = read_json(entry_dir / ENTRY_FILE)
        except (OSError, ValueError):
            return f"{ENTRY_FILE} missing or unreadable"
        if not isinstance(info, dict) or info.get("format") != ENTRY_FORMAT or info.get("key") != key:
            return f"{ENTRY_FILE} does not describe entry {key}"
        run = entry_dir / RUN_SUBDIR
        try:
            report = check_run_dir(run)
            manifest = load_manifest(run)
        except (OSError, ValueError) as exc:
            return f"manifest unreadable: {exc}"
        if not report.intact:
            parts = [
                f"{name}: {', '.join(files)}"
                for name, files in (
                    ("not a regular file (tampering)", report.irregular),
                    ("altered", report.altered),
                    ("missing", report.missing),
                    ("extra", report.extra),
                )
                if files
            ]
            return "manifest check failed (" + ("; ".join(parts) or "no manifest") + ")"
        if manifest is None or manifest.get("deterministic_digest") != info.get("deterministic_digest"):
            return "the manifest was replaced (deterministic digest differs from the one stored)"
        return None

    def lookup(self, key: str) -> Path | None:
        """The intact stored run directory for `key`, or None; a corrupt entry is removed, with a warning."""
        entry_dir = self._entry_dir(key)
        if not entry_dir.is_dir():
            return None
        with self._locked(exclusive=False):
            if not entry_dir.is_dir():
                return None
            problem = self._verify_entry(key, entry_dir)
            if problem is None:
                with contextlib.suppress(OSError):
                    os.utime(entry_dir / ENTRY_FILE)  # last use, for gc
                return entry_dir / RUN_SUBDIR
        message = f"cache entry {key[:12]} is corrupted and was removed: {problem}"
        log.warning(message)
        warnings.warn(message, CacheCorruptionWarning, stacklevel=2)
        with self._locked(exclusive=True):
            # Re-check under the exclusive lock: another process may have replaced it meanwhile.
            if entry_dir.is_dir() and self._verify_entry(key, entry_dir) is not None:
                self._remove_dir(entry_dir)
        return None

    def store(self, key: str, run_dir: Path | str, material: Mapping[str, Any] | None = None) -> Path:
        """Copy a finished, intact run's manifest-listed files into the cache (temp dir, then rename).

        The key material recorded is `material`, else the one a CacheKey carries (a plain str
        key records none). Checkpoints, the lock file and temp files are never copied (the
        manifest does not list them). If another process stored the same key first, its
        entry is kept."""
        if material is None:
            material = getattr(key, "material", None)
        run_dir = Path(run_dir)
        entry_dir = self._entry_dir(key)
        report = check_run_dir(run_dir)
        if not report.intact:
            raise OutputError(f"not caching {run_dir}: it is not a finished, intact run ({report.to_dict()})")
        manifest = load_manifest(run_dir)
        assert manifest is not None
        self._ensure_dirs()
        staging = Path(tempfile.mkdtemp(prefix=f"{key[:12]}-", dir=self.cache_dir / "tmp"))
        try:
            files = sorted(manifest["files"])
            for rel in files:
                _copy_file(run_dir / rel, staging / RUN_SUBDIR / rel)
            _copy_file(run_dir / MANIFEST, staging / RUN_SUBDIR / MANIFEST)
            size = sum(int(entry.get("size", 0)) for entry in manifest["files"].values())
            write_json_atomic(
                staging / ENTRY_FILE,
                {
                    "format": ENTRY_FORMAT,
                    "key": str(key),
                    "material": dict(material) if material is not None else None,
                    "created_at": _iso(time.time()),
                    "source_run_dir": str(run_dir.resolve()),
                    "deterministic_digest": manifest.get("deterministic_digest"),
                    "file_count": len(files),
                    "size_bytes": size,
                },
            )
            with self._locked(exclusive=True):
                if entry_dir.is_dir():
                    problem = self._verify_entry(key, entry_dir)
                    if problem is None:
                        log.info("cache entry %s was already stored", key[:12])
                        return entry_dir / RUN_SUBDIR
                    log.warning("replacing corrupted cache entry %s: %s", key[:12], problem)
                    self._remove_dir(entry_dir)
                os.rename(staging, entry_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return entry_dir / RUN_SUBDIR

    def restore(self, key: str, output_dir: Path | str, source: Path | None = None) -> bool:
        """Copy a verified entry into `output_dir` (manifest last, as train writes); False on a miss.

        `source` is what `lookup(key)` just returned (verified then; not hashed again), else the
        entry is looked up now. `output_dir` may exist (e.g. holding train's lock file) but must
        not hold a finished run; any file there that the entry also has is replaced. The copy
        is checked against its manifest."""
        output_dir = Path(output_dir)
        source = source or self.lookup(key)
        if source is None:
            return False
        if (output_dir / MANIFEST).exists():
            raise OutputError(f"{output_dir} already holds a finished run; not restoring cache entry over it")
        with self._locked(exclusive=False):
            manifest = load_manifest(source)
            if manifest is None:  # removed since lookup: treat as a miss
                return False
            output_dir.mkdir(parents=True, exist_ok=True)
            for rel in sorted(manifest["files"]):
                _copy_file_atomic(source / rel, output_dir / rel)
            _copy_file_atomic(source / MANIFEST, output_dir / MANIFEST)
        report = check_run_dir(output_dir)
        if not report.intact:
            raise OutputError(
                f"restored cache entry {key[:12]} into {output_dir}, but the result does not match its "
                f"manifest (missing {report.missing}, altered {report.altered}, extra {report.extra})"
            )
        return True

    # -- listing and garbage collection -----------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every entry, most recently used first (no re-hashing; `lookup` verifies)."""
        root = self.cache_dir / "entries"
        if not root.is_dir():
            return []
        found = []
        for entry_dir in root.iterdir():
            if not entry_dir.is_dir() or not _KEY_RE.match(entry_dir.name):
                continue
            info: dict[str, Any] = {}
            with contextlib.suppress(OSError, ValueError):
                loaded = read_json(entry_dir / ENTRY_FILE)
                info = loaded if isinstance(loaded, dict) else {}
            try:
                last_used = (entry_dir / ENTRY_FILE).stat().st_mtime
            except OSError:
                last_used = entry_dir.stat().st_mtime
            material = info.get("material") or {}
            found.append(
                {
                    "key": entry_dir.name,
                    "path": str(entry_dir / RUN_SUBDIR),
                    "created_at": info.get("created_at"),
                    "last_used_at": _iso(last_used),
                    "last_used": last_used,
                    "size_bytes": info.get("size_bytes"),
                    "file_count": info.get("file_count"),
                    "deterministic_digest": info.get("deterministic_digest"),
                    "config_hash": material.get("config_hash"),
                    "profile": material.get("profile"),
                    "qlorax_version": material.get("qlorax_version"),
                    "source_run_dir": info.get("source_run_dir"),
                    "valid_metadata": bool(info) and info.get("key") == entry_dir.name,
                }
            )
        return sorted(found, key=lambda e: (-e["last_used"], e["key"]))

    def gc(self, max_entries: int | None = None, older_than_seconds: float | None = None) -> list[str]:
        """Remove entries unused for `older_than_seconds` and beyond the `max_entries` most recent.

        Also removes entries without valid metadata and stale temp dirs. Returns removed keys."""
        if max_entries is not None and max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        removed: list[str] = []
        if not self.cache_dir.is_dir():
            return removed
        with self._locked(exclusive=True):
            now = time.time()
            kept = 0
            for entry in self.entries():
                too_old = older_than_seconds is not None and now - entry["last_used"] > older_than_seconds
                too_many = max_entries is not None and kept >= max_entries
                if too_old or too_many or not entry["valid_metadata"]:
                    self._remove_dir(self._entry_dir(entry["key"]))
                    removed.append(entry["key"])
                else:
                    kept += 1
            tmp = self.cache_dir / "tmp"
            for stale in tmp.iterdir() if tmp.is_dir() else ():
                with contextlib.suppress(OSError):
                    if now - stale.stat().st_mtime > _STALE_TMP_SECONDS:
                        shutil.rmtree(stale, ignore_errors=True)
        return removed
