"""The training process: started by the launcher with the determinism pins already set.

Reads its job as JSON on stdin, owns the run directory's lock while it trains, and turns
every user-facing failure into one message and a documented exit code.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

from qlorax.errors import EXIT_BAD_INPUT, QloraxError


def _progress_printer():
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


def _quiet_libraries() -> None:
    """Library progress bars and deprecation chatter are noise in a run's output."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def main() -> int:
    from qlorax.config import parse_config
    from qlorax.rundir import RunLock

    _quiet_libraries()
    payload = json.loads(sys.stdin.read())
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
            results = run_training(job, progress=_progress_printer())
        except Interrupted as stop:
            print(f"interrupted after step {stop.step}; a checkpoint was written. Continue with: "
                  f"qlorax resume {output_dir}", file=sys.stderr, flush=True)
            return stop.exit_code
        print(f"finished: train loss {results['train_loss']:.4f}, eval loss {results['eval_loss']:.4f}", flush=True)
        return 0
    except QloraxError as exc:
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        _mark_failed(output_dir, exc.message)
        return exc.exit_code
    except Exception as exc:
        if not _is_disk_full(exc):
            raise
        message = (f"the disk is full while writing into {output_dir}; the run is incomplete (no manifest was "
                   "written). Free space and continue it with `qlorax resume`.")
        print(f"error: {message}", file=sys.stderr, flush=True)
        _mark_failed(output_dir, message)
        return EXIT_BAD_INPUT
    finally:
        lock.release()


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC from Python or from a Rust writer (safetensors reports 'os error 28')."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text


def _mark_failed(output_dir: Path, message: str) -> None:
    """Say plainly that this directory is not a finished run (best effort: the disk may be full)."""
    from qlorax.artifacts import MANIFEST_NAME, write_json_atomic

    if not output_dir.is_dir() or (output_dir / MANIFEST_NAME).exists():
        return
    try:
        write_json_atomic(output_dir / "training_metadata.json", {"status": "failed", "error": message})
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
