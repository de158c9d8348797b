"""Run a job (train, env, ...) in a fresh child process with the determinism pins in its environment.

Thread pools, MKL's CNR mode and the instruction set are fixed when torch loads, so they
cannot be set from inside a process that already imported it. The launcher computes the
pins for the profile, removes any conflicting numeric variables the user had set
(recording their names, never their values), starts `python -m qlorax.worker` with the job
as JSON on stdin, forwards SIGINT/SIGTERM and returns the child's exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qlorax import interrupts
from qlorax.config import QloraxConfig
from qlorax.determinism import child_environment

WORKER_COMMAND = (sys.executable, "-m", "qlorax.worker")


def default_threads() -> int:
    """The cores this process may use (its CPU affinity), at least 1."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def job_environment(profile: str, threads: int, extra_env: Mapping[str, str] | None = None
                    ) -> tuple[dict[str, str], list[str]]:
    """The child's environment (this process's, pinned) and the names of the variables removed."""
    parent_env = dict(os.environ)
    parent_env.update(extra_env or {})
    return child_environment(parent_env, profile, threads)


def _prepare_job(kind: str, payload: Mapping[str, Any], profile: str, threads: int,
                 extra_env: Mapping[str, str] | None = None) -> tuple[dict[str, str], str]:
    """The child's pinned environment and the JSON job it reads on stdin."""
    env, removed = job_environment(profile, threads, extra_env)
    return env, json.dumps({**payload, "kind": kind, "threads": threads, "removed_env": removed})


class _Children:
    """The live children of this process and the signal that asked them to stop: a signal
    reaching the parent (main thread) is forwarded to every child, including those a verify
    pool started from worker threads, and no new child starts after it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: set[subprocess.Popen[str]] = set()
        self.stopping: int | None = None

    def forward(self, signum: int, _frame: Any) -> None:
        self.stopping = signum
        with self.lock:
            live = list(self.live)
        for process in live:
            if process.poll() is None:
                with contextlib.suppress(OSError):
                    process.send_signal(signum)


CHILDREN = _Children()


@contextlib.contextmanager
def forwarding_signals() -> Iterator[None]:
    """While open (in the main thread), SIGINT/SIGTERM go to the children instead of ending
    this process; nested use keeps the outer forwarding."""
    if threading.current_thread() is not threading.main_thread() or (
            signal.getsignal(signal.SIGTERM) == CHILDREN.forward):
        yield
        return
    CHILDREN.stopping = interrupts.requested
    previous = interrupts.install(CHILDREN.forward)
    try:
        yield
    finally:
        interrupts.restore(previous)


def launch_job(kind: str, payload: Mapping[str, Any], profile: str, threads: int, *,
               extra_env: Mapping[str, str] | None = None, stdout: Any = None, stderr: Any = None,
               wrapper: Sequence[str] = ()) -> int:
    """Run one job of `kind` in a pinned child; returns its exit code (0, 1, 2, 130, 143, ...).
    SIGINT/SIGTERM sent to this process are forwarded to the child, which stops cleanly; a
    child killed by a signal returns 128 + its number, with one line saying so. `wrapper`
    prefixes the child's command line (e.g. `qemu-x86_64 -cpu Haswell-v4`, which runs the
    same Python on an emulated processor)."""
    env, message = _prepare_job(kind, payload, profile, threads, extra_env)
    with forwarding_signals():
        if CHILDREN.stopping is not None:  # asked to stop before this child started
            return interrupts.exit_code_for(CHILDREN.stopping)
        process = subprocess.Popen((*wrapper, *WORKER_COMMAND), stdin=subprocess.PIPE, env=env, stdout=stdout,
                                   stderr=stderr, text=True)
        with CHILDREN.lock:
            CHILDREN.live.add(process)
        try:
            if CHILDREN.stopping is not None:
                process.send_signal(CHILDREN.stopping)
            assert process.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # the child may already have stopped
                process.stdin.write(message)
                process.stdin.close()
            returncode = process.wait()
        finally:
            with CHILDREN.lock:
                CHILDREN.live.discard(process)
    if returncode < 0:
        print(f"the {kind} process was killed by {interrupts.signal_name(-returncode)} before it could stop "
              "cleanly", file=stderr if hasattr(stderr, "write") else sys.stderr, flush=True)
    return interrupts.code_of_child(returncode)


def run_job_captured(kind: str, payload: Mapping[str, Any], profile: str, threads: int, *,
                     extra_env: Mapping[str, str] | None = None, wrapper: Sequence[str] = ()
                     ) -> subprocess.CompletedProcess[str]:
    """Run a short job (e.g. env) in a pinned child (under `wrapper`) and capture what it prints."""
    env, message = _prepare_job(kind, payload, profile, threads, extra_env)
    return subprocess.run((*wrapper, *WORKER_COMMAND), input=message, env=env, capture_output=True, text=True,
                          check=False)


def launch_training(config: QloraxConfig, output_dir: Path, threads: int, *, resume: bool = False,
                    extra_env: Mapping[str, str] | None = None, stdout: Any = None, stderr: Any = None,
                    wrapper: Sequence[str] = ()) -> int:
    """Train in a child process (under `wrapper`, see launch_job); returns its exit code."""
    payload = {"config": config.canonical(), "output_dir": str(Path(output_dir).resolve()), "resume": resume}
    return launch_job("train", payload, config.determinism.profile, threads, extra_env=extra_env,
                      stdout=stdout, stderr=stderr, wrapper=wrapper)
