"""Run a training job in a fresh child process with the determinism pins in its environment.

Thread pools, MKL's CNR mode and the instruction set are fixed when torch loads, so they
cannot be set from inside a process that already imported it. The launcher computes the
pins, removes any conflicting numeric variables the user had set (recording their
names), starts `python -m qlorax.worker`, forwards SIGINT/SIGTERM and returns its exit code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlorax.config import QloraxConfig
from qlorax.determinism import child_environment


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def launch_training(config: QloraxConfig, output_dir: Path, threads: int, *, resume: bool = False,
                    extra_env: Mapping[str, str] | None = None, stdout: Any = None, stderr: Any = None) -> int:
    """Train in a child process; returns its exit code (0, 2, 130, 143, ...)."""
    parent_env = dict(os.environ)
    parent_env.update(extra_env or {})
    env, removed = child_environment(parent_env, config.determinism.profile, threads)
    payload = {"config": config.canonical(), "output_dir": str(Path(output_dir).resolve()), "threads": threads,
               "resume": resume, "removed_env": removed}
    process = subprocess.Popen([sys.executable, "-m", "qlorax.worker"], stdin=subprocess.PIPE, env=env,
                               stdout=stdout, stderr=stderr, text=True)

    def forward(signum: int, _frame: Any) -> None:
        if process.poll() is None:
            process.send_signal(signum)

    previous = {}
    in_main_thread = _in_main_thread()
    if in_main_thread:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, forward)
    try:
        assert process.stdin is not None
        process.stdin.write(json.dumps(payload))
        process.stdin.close()
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
