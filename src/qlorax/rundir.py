"""Output-directory safety: one live run per directory, finished runs never overwritten.

The lock is an flock on `.qlorax.lock` holding the owner's pid: the kernel drops it when
the process dies, so a lock file left by a dead process is stale by construction and is
taken over (with a warning naming the dead pid).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from qlorax.artifacts import utc_now, write_json_atomic
from qlorax.checkpoint import list_checkpoints
from qlorax.errors import OutputError
from qlorax.layout import LOCK, MANIFEST, METADATA, TRAIN_LOG
from qlorax.ops.secrets import scrub_text


def lock_holder(run_dir: Path) -> int | None:
    """The pid holding the directory's lock, or None when nobody does."""
    path = run_dir / LOCK
    if not path.is_file():
        return None
    try:
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                text = handle.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


class RunDirectoryLost(OutputError):
    """The locked directory vanished (or was replaced) under a live process."""

    def __init__(self, run_dir: Path):
        super().__init__(f"the run directory {run_dir} was deleted or replaced while the run was writing into it "
                         "(its lock was ignored: `rm`, or a `qlorax gc` on another host of a shared volume); this run "
                         "is lost and wrote nothing more there. Start it again with `qlorax train --output-dir "
                         f"{run_dir}`.")


class RunLock:
    """Exclusive ownership of a run directory for the life of a training process."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.handle = None
        self.warning: str | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise OutputError(f"output directory {self.path.parent} is in use by a running qlorax process "
                              f"(pid {holder}); wait for it to finish or choose another --output-dir") from None
        handle.seek(0)
        previous = handle.read().strip()
        if previous.isdigit() and int(previous) != os.getpid():
            self.warning = (f"taking over a stale lock on {self.path.parent} left by pid {previous}, "
                            "which is no longer running")
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def intact(self) -> bool:
        """True while the lock file at the path is still the one this lock holds: False once the
        directory was deleted (or deleted and made again) by someone who ignored the lock."""
        if self.handle is None:
            return False
        try:
            return os.stat(self.path).st_ino == os.fstat(self.handle.fileno()).st_ino
        except OSError:
            return False

    def check(self) -> None:
        """Raise RunDirectoryLost once the directory is no longer the one this lock holds, before
        anything more is written there (writing would make the directory again, half full)."""
        if not self.intact():
            raise RunDirectoryLost(self.path.parent)

    def release(self) -> None:
        if self.handle is None:
            return
        try:
            if self.intact():  # never another process's lock in a directory made again at this path
                self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def prepare_output_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse live, finished or interrupted directories unless asked; check it is writable."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"--output-dir {run_dir} exists and is not a directory")
    holder = lock_holder(run_dir) if run_dir.is_dir() else None
    if holder is not None:
        raise OutputError(f"output directory {run_dir} is in use by a running qlorax process (pid {holder}); "
                          "wait for it to finish or choose another --output-dir")
    finished = (run_dir / MANIFEST).is_file()
    if finished and not force:
        raise OutputError(f"output directory {run_dir} holds a finished run (it has {MANIFEST}); "
                          "refusing to overwrite it: pass --force to replace it, or choose another --output-dir")
    if force and run_dir.is_dir():
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    elif list_checkpoints(run_dir) and not resume:
        raise OutputError(f"output directory {run_dir} holds checkpoints of an interrupted run; continue it with "
                          f"`qlorax resume {run_dir}` (or --resume), or pass --force to start over")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test.", suffix=".tmp"):
            pass
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise OutputError(f"output directory {run_dir} is not writable: {reason}") from None


def mark_failed(output_dir: Path, message: str, *, detail: str | None = None, status: str = "failed") -> None:
    """Say plainly that this directory is not a finished run (best effort: the disk may be full);
    an upstream error's full text goes to train.log."""
    if not output_dir.is_dir() or (output_dir / MANIFEST).exists():
        return
    try:
        write_json_atomic(output_dir / METADATA, {"status": status, "error": scrub_text(message)})
        if detail:
            with open(output_dir / TRAIN_LOG, "a", encoding="utf-8") as log:
                log.write(f"{utc_now()} error: {scrub_text(message)}\n{scrub_text(detail)}\n")
    except OSError:
        pass
