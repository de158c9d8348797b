"""The `train` job: one training run into a run directory, which it owns (locks) while it runs.

A failure that leaves the directory unfinished marks it failed in training_metadata.json
(never a manifest), so nothing half-written can pass as a finished run.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any

from qlorax.artifacts import write_json_atomic
from qlorax.config import parse_config
from qlorax.errors import EXIT_BAD_INPUT, QloraxError
from qlorax.layout import MANIFEST, METADATA
from qlorax.rundir import RunLock


def run(payload: dict[str, Any]) -> int:
    output_dir = Path(payload["output_dir"])
    lock = RunLock(output_dir)
    try:
        lock.acquire()
        if lock.warning:
            print(f"warning: {lock.warning}", file=sys.stderr, flush=True)
        from qlorax.train import Interrupted, TrainingJob, run_training

        job = TrainingJob(config=parse_config(payload["config"], "resolved config"), output_dir=output_dir,
                          threads=int(payload["threads"]), resume=bool(payload.get("resume")),
                          removed_env=list(payload.get("removed_env", [])))
        try:
            results = run_training(job, progress=progress_printer())
        except Interrupted as stop:
            print(f"interrupted after step {stop.step}; a checkpoint was written. Continue with: "
                  f"qlorax resume {output_dir}", file=sys.stderr, flush=True)
            return stop.exit_code
        print(f"finished: train loss {results['train_loss']:.4f}, eval loss {results['eval_loss']:.4f}", flush=True)
        return 0
    except QloraxError as exc:
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        mark_failed(output_dir, exc.message)
        return exc.exit_code
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        message = (f"the disk is full while writing into {output_dir}; the run is incomplete (no manifest was "
                   "written). Free space and continue it with `qlorax resume`.")
        print(f"error: {message}", file=sys.stderr, flush=True)
        mark_failed(output_dir, message)
        return EXIT_BAD_INPUT
    finally:
        lock.release()


def progress_printer() -> Any:
    """A rich progress bar on a terminal; plain lines every 10 steps otherwise."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} tok/s"),
                            TimeRemainingColumn(), transient=True)
        task = None

        def update(step: int, total: int, loss: float, rate: float) -> None:
            nonlocal task
            if task is None:
                progress.start()
                task = progress.add_task("train", total=total, loss=loss, rate=rate, completed=step - 1)
            progress.update(task, completed=step, loss=loss, rate=rate)
            if step == total:
                progress.stop()

        return update

    def plain(step: int, total: int, loss: float, rate: float) -> None:
        if step % 10 == 0 or step == total:
            print(f"step {step}/{total}  loss {loss:.4f}  {rate:.0f} tokens/s", flush=True)

    return plain


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC from Python or from a Rust writer (safetensors reports 'os error 28')."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text


def mark_failed(output_dir: Path, message: str) -> None:
    """Say plainly that this directory is not a finished run (best effort: the disk may be full)."""
    if not output_dir.is_dir() or (output_dir / MANIFEST).exists():
        return
    try:
        write_json_atomic(output_dir / METADATA, {"status": "failed", "error": message})
    except OSError:
        pass
