"""Use case `gc`: delete finished run and verification directories nobody needs any more.

It removes what a finished verification or training left behind once nobody needs it:
finished run directories (they hold `artifact_summary.json`) and verification directories
(they hold `reproducibility_analysis_report.json`) whose newest file is older than a given
age; with `include_incomplete` also unfinished ones (interrupted or failed). Nothing is
deleted unless asked (`delete=True`: `qlorax gc --yes`). It never deletes a directory that a
live process holds, whatever its age: its own `.qlorax.lock` or one of a directory above it up
to ROOT (a run inside a running verification) whose flock is held or whose pid is running;
while deleting, gc holds the directory's lock itself, so a train or resume starting there at
that moment is refused. It never follows a symbolic link, so nothing outside ROOT can be
reached through one. No torch: `gc` runs from cron and from scripts/auto_recovery.sh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from qlorax.errors import OutputError, QloraxError
from qlorax.layout import CHECKPOINT_CONFIG, CHECKPOINTS_DIR, LOCK, LOGS_DIR, MANIFEST, REPORT_JSON, RUN_MARKERS
from qlorax.rundir import RunLock
from qlorax.rundir import lock_holder as flock_holder

_RUN_NAME = re.compile(r"run-\d{2,}")  # layout.verification_run_name


@dataclass
class Candidate:
    """A directory `gc` may delete, with what the table shows about it."""

    path: Path
    kind: str  # "run" or "verification"
    newest_mtime: float
    size: int
    held_by: str | None = None  # why it must be kept (a live lock), if it must


def _pid_alive(pid: int) -> bool:
    """True when a process with this pid exists here (EPERM means it exists but is not ours)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True  # unknown: keep the directory
    return True


def why_locked(lock_path: Path) -> str | None:
    """Why a lock file still protects its directory, or None when it is stale.

    Held when its flock is held, or when the pid it names (a bare pid, as `qlorax train`
    writes, or JSON with "pid" and optionally "host"/"hostname") is alive here. A lock we
    cannot read, or one written on another host (a shared volume), counts as held: we
    cannot prove its owner is gone, and deleting a live run is the worse mistake.
    """
    try:
        text = lock_path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as exc:
        return f"unreadable lock ({exc.strerror})"
    pid: int | None = None
    host: str | None = None
    try:
        data = json.loads(text) if text else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        raw = data.get("pid")
        pid = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
        raw_host = data.get("host", data.get("hostname"))
        host = raw_host if isinstance(raw_host, str) and raw_host else None
    elif isinstance(data, int) and not isinstance(data, bool):
        pid = data
    else:
        found = re.search(r"\b(\d+)\b", text)
        pid = int(found.group(1)) if found else None
    if flock_holder(lock_path.parent) is not None:  # authoritative on one host: the kernel drops it on exit
        return f"locked by live pid {pid}" if pid is not None else "locked by a running process"
    if host is not None and host != socket.gethostname():
        return f"locked by pid {pid} on host {host}"
    if pid is not None and _pid_alive(pid):
        return f"locked by live pid {pid}"
    return None  # nobody holds it: left behind by a process that is gone


def _scan_tree(directory: Path, ignore: Path | None = None) -> tuple[float, int, str | None]:
    """Newest mtime, total file size and any live lock below `directory` (except `ignore`, the
    one gc holds itself), never following links."""
    newest = directory.lstat().st_mtime
    size = 0
    held_by: str | None = None
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        for name in dirnames:  # os.walk lists links to directories here without entering them
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                continue
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            newest = max(newest, info.st_mtime)
            if stat.S_ISREG(info.st_mode):
                size += info.st_size
                if name == LOCK and held_by is None and Path(path) != ignore:
                    held_by = why_locked(Path(path))
    return newest, size, held_by


def _kind(directory: Path, include_incomplete: bool) -> str | None:
    """What a directory is to gc: a finished verification or run, or (only when asked) an
    unfinished one: a run with qlorax's own markers, a verification with logs/ and run-NN/."""
    names = set(os.listdir(directory)) if os.access(directory, os.R_OK | os.X_OK) else set()
    if REPORT_JSON in names:
        return "verification"
    if MANIFEST in names:
        return "run"
    if not include_incomplete:
        return None
    if LOGS_DIR in names and any(_RUN_NAME.fullmatch(name) for name in names):
        return "incomplete verification"
    if names & {LOCK, *RUN_MARKERS} or (directory / CHECKPOINTS_DIR / CHECKPOINT_CONFIG).is_file():
        return "incomplete run"
    return None


def _held_above(directory: Path, root: Path) -> str | None:
    """A live lock on a directory between `directory` and `root` (both included): a run inside
    a verification that is still running belongs to it, finished or not."""
    for ancestor in (directory, *directory.parents):
        if (ancestor / LOCK).is_file():
            reason = why_locked(ancestor / LOCK)
            if reason:
                return f"{reason} on {ancestor.name or ancestor}"
        if ancestor == root or not ancestor.is_relative_to(root):
            break
    return None


def find_candidates(root: Path, include_incomplete: bool = False) -> list[Candidate]:
    """Finished (and, when asked, unfinished) run and verification directories strictly below
    `root` (links are skipped)."""
    found: list[Candidate] = []
    for dirpath, dirnames, _filenames in os.walk(root, followlinks=False):
        current = Path(dirpath)
        kept_dirs = []
        for name in sorted(dirnames):
            child = current / name
            if child.is_symlink():
                continue
            kind = _kind(child, include_incomplete)
            if kind is None:
                kept_dirs.append(name)  # look deeper: a plain folder of runs
                continue
            newest, size, held_by = _scan_tree(child)
            found.append(Candidate(child, kind, newest, size, held_by or _held_above(current, root)))
        dirnames[:] = kept_dirs
    return sorted(found, key=lambda c: str(c.path))


def _inside(path: Path, root: Path) -> bool:
    """True when `path` (not resolved through a final link) lies strictly inside `root`."""
    try:
        resolved = path.parent.resolve(strict=True) / path.name
    except OSError:
        return False
    return resolved != root and resolved.is_relative_to(root)


def _delete(candidate: Candidate, root: Path) -> str | None:
    """Delete one directory after re-checking it; return an error message or None."""
    path = candidate.path
    if path.is_symlink() or not path.is_dir():
        return "no longer a real directory"
    if not _inside(path, root):
        return "outside the gc root"
    # Hold the directory's own lock while deleting it: a train, resume or verify that starts now
    # is refused (exit 2 naming gc's pid) instead of writing into a directory being removed.
    lock = RunLock(path)
    try:
        lock.acquire()
    except OutputError:
        return f"kept: {why_locked(path / LOCK) or 'locked by a running process'}"
    except OSError as exc:
        return f"{exc.strerror or exc}"
    try:
        _, _, held_by = _scan_tree(path, ignore=lock.path)  # a run may have started inside since the scan
        held_by = held_by or _held_above(path.parent, root)
        if held_by:
            return f"kept: {held_by}"
        try:
            shutil.rmtree(path)  # removes links themselves, never what they point to
        except OSError as exc:
            return f"{exc.strerror or exc}"
        return None
    finally:
        lock.release()


@dataclass
class Collection:
    """What one gc pass found under its root and did: each old directory with the action taken
    (or, in a dry run, that would be taken), and the counts the summary line reports."""

    root: Path  # resolved
    now: float
    actions: list[tuple[Candidate, str]] = field(default_factory=list)
    young: int = 0  # directories newer than the age, kept
    held: int = 0  # old directories a live lock keeps
    deletable: list[Candidate] = field(default_factory=list)
    failures: int = 0
    freed: int = 0


def _act(candidate: Candidate, root: Path, delete: bool, result: Collection) -> str:
    """Delete one old directory (when asked and nothing holds it); the action, in words."""
    if candidate.held_by:
        return f"keep ({candidate.held_by})"
    if not delete:
        return "would delete"
    error = _delete(candidate, root)
    if error is None:
        result.freed += candidate.size
        return "deleted"
    if error.startswith("kept:"):
        return f"keep ({error[6:]})"
    result.failures += 1
    return f"FAILED: {error}"


def collect(root: Path, max_age: float, *, delete: bool = False, include_incomplete: bool = False) -> Collection:
    """Find the run and verification directories under `root` older than `max_age` seconds and,
    with `delete`, delete those no live process holds. QloraxError when root is not a directory."""
    if root.is_symlink() or not root.is_dir():
        raise QloraxError(f"--root {root} is not a directory (a link is not accepted as the root).")
    result = Collection(root=root.resolve(), now=time.time())
    candidates = find_candidates(result.root, include_incomplete)
    old = [c for c in candidates if result.now - c.newest_mtime > max_age]
    result.deletable = [c for c in old if c.held_by is None]
    result.young = len(candidates) - len(old)
    result.held = len(old) - len(result.deletable)
    result.actions = [(candidate, _act(candidate, result.root, delete, result)) for candidate in old]
    return result
