"""Run a job (train, env, ...) in a fresh child process with the determinism pins in its environment.

Thread pools, MKL's CNR mode and the instruction set are fixed when torch loads, so they
cannot be set from inside a process that already imported it. The launcher computes the
pins for the profile, removes any conflicting numeric variables the user had set
(recording their names, never their values), starts `python -m qlorax.worker` with the job
as JSON on stdin, forwards SIGINT/SIGTERM and returns the child's exit code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def launch_job(kind: str, payload: Mapping[str, Any], profile: str, threads: int, *,
               extra_env: Mapping[str, str] | None = None, stdout: Any = None, stderr: Any = None,
               wrapper: Sequence[str] = ()) -> int:
    """Run one job of `kind` in a pinned child; returns its exit code (0, 1, 2, 130, 143, ...).
    SIGINT/SIGTERM sent to this process are forwarded to the child, which finishes cleanly.
    `wrapper` prefixes the child's command line (e.g. `qemu-x86_64 -cpu Haswell-v4`, which
    runs the same Python on an emulated processor)."""
    env, message = _prepare_job(kind, payload, profile, threads, extra_env)
    process = subprocess.Popen((*wrapper, *WORKER_COMMAND), stdin=subprocess.PIPE, env=env, stdout=stdout,
                               stderr=stderr, text=True)

    def forward(signum: int, _frame: Any) -> None:
        if process.poll() is None:
            process.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, forward)
    try:
        assert process.stdin is not None
        process.stdin.write(message)
        process.stdin.close()
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
