"""Test only: run `qlorax` with a Ray task that SIGKILLs its own worker once, mid-run.

    python tests/ray_kill_once.py MARKER verify --executor ray ...

swaps the Ray executor's task for `kill_once_task`, then runs the real CLI. The first task
that creates MARKER (O_EXCL) starts a watcher thread and runs the real task; once the
training child has written its first checkpoint, the watcher records the worker's pid, its
children and its attempt directory in MARKER (JSON) and SIGKILLs the worker, so Ray sees a
worker crash mid-run and must retry the task. Every other task, and every retry, just runs
the real task. Production code carries no hook for this.

This file runs as __main__, so Ray (cloudpickle) ships `kill_once_task` to the workers by
value, MARKER included: the workers need nothing from tests/ on their path.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import qlorax.executors.ray as ray_executor

MARKER = ""  # set by main() before the CLI runs; pickled with kill_once_task


def kill_once_task(config: dict[str, Any], run_name: str, threads: int, job: dict[str, Any]) -> dict[str, Any]:
    """The executor's task, with the one-time kill armed for the first task that gets the marker."""
    _arm_kill_once(Path(MARKER), run_name, job)
    # In the worker this is the module's own, unpatched task (the swap exists only in the driver).
    return ray_executor._train_task(config, run_name, threads, job)


def _arm_kill_once(marker: Path, run_name: str, job: dict[str, Any]) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    base = Path(job["shared_base"]) if job.get("shared_base") else Path(tempfile.gettempdir()) / (
        f".qlorax-ray-{job['token']}")
    run_base = base / run_name

    def watch() -> None:
        import psutil

        deadline = time.monotonic() + 300
        checkpoints: list[Path] = []
        stored = (job.get("storage") or {}).get(run_name)  # a durable run (a shared path): its first stored checkpoint
        while not checkpoints and time.monotonic() < deadline:
            checkpoints = sorted(run_base.glob("attempt-*/run/checkpoints"))
            if stored and not list(Path(stored["uri"]).glob("checkpoints/step-*/checkpoint_manifest.json")):
                checkpoints = []
            time.sleep(0.02)
        if not checkpoints:  # never reached a checkpoint: leave the marker empty, the test fails
            os.close(fd)
            return
        run_dir = checkpoints[0].parent
        attempt = int(run_dir.parent.name.split("-")[1])  # attempt-<n>-<random>
        children = [child.pid for child in psutil.Process().children(recursive=True)]
        record = {"run": run_name, "attempt": attempt, "worker_pid": os.getpid(), "children": children,
                  "run_dir": str(run_dir)}
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="qlorax-test-kill", daemon=True).start()


def main() -> None:
    """`ray_kill_once.py MARKER ARGS...`: the qlorax CLI with ARGS, the kill-once task swapped in."""
    global MARKER
    MARKER = sys.argv.pop(1)
    ray_executor._train_task = kill_once_task  # run_ray looks the task up when it is called
    from qlorax.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
