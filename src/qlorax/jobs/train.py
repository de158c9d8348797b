"""The `train` job: one training run into a run directory, which it owns (locks) while it runs.

A failure that leaves the directory unfinished marks it failed in training_metadata.json
(never a manifest), so nothing half-written can pass as a finished run. A directory deleted
under the run (its lock ignored) ends the run with one paragraph and no further write there.

With several workers (payload "world": rank, size, address, port, timeout_s) every worker
runs this job; rank 0 owns the directory and writes everything, the others only compute.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlorax.config import parse_config
from qlorax.determinism import pinned_profile
from qlorax.devices import get_device
from qlorax.distributed import WorkerLost
from qlorax.errors import EXIT_BAD_INPUT, ConfigError, QloraxError
from qlorax.inputs import ResolvedInputs
from qlorax.interrupts import JobInterrupted, signal_name
from qlorax.layout import CHECKPOINT_CONFIG, CHECKPOINT_PREFIX, CHECKPOINTS_DIR
from qlorax.ops.secrets import scrub_text
from qlorax.phases import Phases
from qlorax.profiles import PROFILES
from qlorax.rundir import RunDirectoryLost, RunLock, mark_failed
from qlorax.storage.store import StorageSpec


def refuse_unsupported_processor() -> None:
    """Before torch loads: a processor without the instructions the profile pins (portable:
    AVX2 and FMA) would run other kernels and give other bits, silently; refuse it (exit 2)."""
    profile = pinned_profile()
    reason, cpu = get_device(PROFILES[profile].device).unsupported(PROFILES[profile])
    if reason:
        emulated = f", emulated as {cpu['emulated_cpu']}" if cpu.get("emulated") else ""
        raise ConfigError(f"{reason} (read with CPUID{emulated}, before training): its kernels would fall back to "
                          f"other instructions and give other bits, so the {profile} profile refuses it. Train "
                          f"with --profile strict for bits tied to this kind of processor.")


def run(payload: dict[str, Any]) -> int:
    output_dir = Path(payload["output_dir"])
    world = payload.get("world") or {}
    if int(world.get("rank", 0)) != 0:
        return run_helper_worker(payload, output_dir, world)
    lock = RunLock(output_dir)
    job = None
    phases = progress_printer()
    try:
        lock.acquire()
        if lock.warning:
            print(f"warning: {lock.warning}", file=sys.stderr, flush=True)
        refuse_unsupported_processor()
        phases.begin("start", "importing torch, transformers and peft")
        from qlorax.train import FinishedDespiteSignal, Interrupted, run_training

        job = joined_training_job(payload, output_dir, lock.check)
        try:
            results = run_training(job, progress=phases.step, phases=phases)
            phases.close()
        except Interrupted as stop:
            phases.close()
            print(f"interrupted after step {stop.step}; a checkpoint was written. Continue with: "
                  f"qlorax resume {output_dir}", file=sys.stderr, flush=True)
            return stop.exit_code
        except FinishedDespiteSignal as late:
            phases.close()
            print(f"interrupted by {signal_name(late.signum)} after the last step; the run finished and is "
                  f"complete in {output_dir} (`qlorax check` verifies it)", file=sys.stderr, flush=True)
            return late.exit_code
        assert results is not None  # rank 0 writes the results
        print(f"finished: train loss {results['train_loss']:.4f}, eval loss {results['eval_loss']:.4f}", flush=True)
        return 0
    except JobInterrupted as early:
        print(f"interrupted by {signal_name(early.signum)} before the first training step; "
              f"{interrupted_state(output_dir)}", file=sys.stderr, flush=True)
        mark_failed(output_dir, f"interrupted by {signal_name(early.signum)} before the first step",
                    status="interrupted")
        return early.exit_code
    except QloraxError as exc:
        return report_failure(exc, output_dir, lock)
    except Exception as exc:
        if lock.handle is not None and not lock.intact():  # a write failed because the directory was deleted
            lost = RunDirectoryLost(output_dir)
            print(f"error: {lost.message}", file=sys.stderr, flush=True)
            return lost.exit_code
        if not is_disk_full(exc):
            raise
        message = disk_full_message(output_dir)
        print(f"error: {message}", file=sys.stderr, flush=True)
        mark_failed(output_dir, message)
        return EXIT_BAD_INPUT
    finally:
        phases.close()
        if job is not None:
            from qlorax.distributed import leave_world

            leave_world(job.world)
        lock.release()


def report_failure(exc: QloraxError, output_dir: Path, lock: RunLock) -> int:
    """Print the one-paragraph error and mark the directory failed (never a directory that is
    no longer this run's: nothing may be written into a lost directory); returns the exit code."""
    lost = lock.handle is not None and not lock.intact()
    error = RunDirectoryLost(output_dir) if lost else exc
    message = scrub_text(error.render())
    if isinstance(error, WorkerLost):
        message += (f". The run is incomplete (no manifest); {interrupted_state(output_dir)} (with any number "
                    "of workers)")
    print(f"error: {message}", file=sys.stderr, flush=True)
    if lock.handle is not None and not lost:
        mark_failed(output_dir, error.message, detail=error.detail)
    return error.exit_code


def joined_training_job(payload: dict[str, Any], output_dir: Path,
                        check_ownership: Callable[[], None] = lambda: None) -> Any:
    """This process's TrainingJob: the config checked first, then its place among the run's
    workers joined (a no-op for a single worker)."""
    from qlorax.distributed import join_world
    from qlorax.train import TrainingJob

    config = parse_config(payload["config"], "resolved config")
    world = payload.get("world") or {}
    joined = join_world(int(world.get("rank", 0)), int(world.get("size", 1)), world.get("address", ""),
                        int(world.get("port", 0)), float(world.get("timeout_s", 0)),
                        listen_fd=world.get("listen_fd"))
    inputs = ResolvedInputs.from_json(payload["inputs"]) if payload.get("inputs") else None
    return TrainingJob(config=config, output_dir=output_dir, threads=int(payload["threads"]), inputs=inputs,
                       resume=bool(payload.get("resume")), removed_env=list(payload.get("removed_env", [])),
                       check_ownership=check_ownership, world=joined,
                       executor=str(payload.get("executor", "local")),
                       executor_facts=dict(payload.get("executor_facts") or {}),
                       storage=StorageSpec.from_payload(payload.get("storage")),
                       restarts=list(payload.get("restarts") or []))


def run_helper_worker(payload: dict[str, Any], output_dir: Path, world: dict[str, Any]) -> int:
    """A worker of rank > 0: trains its share of every step with the others and writes nothing
    (rank 0 owns the run directory); its errors are one line naming it."""
    rank, size = int(world["rank"]), int(world["size"])
    job = None
    try:
        refuse_unsupported_processor()
        from qlorax.train import FinishedDespiteSignal, Interrupted, run_training

        job = joined_training_job(payload, output_dir)
        try:
            run_training(job)
        except (Interrupted, FinishedDespiteSignal) as stop:
            return stop.exit_code
        return 0
    except JobInterrupted as early:
        return early.exit_code
    except QloraxError as exc:
        print(f"error: worker {rank} of {size}: {scrub_text(exc.render())}", file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        if job is not None:
            from qlorax.distributed import leave_world

            leave_world(job.world)


def interrupted_state(output_dir: Path) -> str:
    """What a directory interrupted before its first step holds, and what to do with it."""
    from qlorax.checkpoint import list_checkpoints

    if list_checkpoints(output_dir):
        return f"its checkpoints are unchanged: continue with `qlorax resume {output_dir}`"
    if (output_dir / CHECKPOINTS_DIR / CHECKPOINT_CONFIG).is_file():
        return f"nothing was trained yet: `qlorax resume {output_dir}` starts it from step 0 (its config is recorded)"
    return (f"nothing was trained (`qlorax resume` reports it as never started): start it again with "
            f"`qlorax train --output-dir {output_dir}`")


def disk_full_message(output_dir: Path) -> str:
    """What will work after space is freed: `resume` continues from the newest checkpoint, and
    a run that never wrote one can only be started again (resume reports it as never started)."""
    from qlorax.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(output_dir)
    head = (f"the disk is full while writing into {output_dir}; the run is incomplete (no manifest was "
            "written). Free space, then ")
    if checkpoints:
        step = int(checkpoints[-1].name.removeprefix(CHECKPOINT_PREFIX))
        return head + f"continue it from its checkpoint of step {step} with `qlorax resume {output_dir}`."
    if (output_dir / CHECKPOINTS_DIR / CHECKPOINT_CONFIG).is_file():
        return head + f"`qlorax resume {output_dir}` starts it again from step 0 (it wrote no checkpoint)."
    return head + (f"start it again with `qlorax train --output-dir {output_dir}` and the same config: it wrote "
                   "no checkpoint, so `qlorax resume` has nothing to continue from.")


def progress_printer() -> Phases:
    """What the run is doing, phase by phase: rich's live display on a terminal, plain lines
    (one per phase, one every 10 steps) otherwise (qlorax.phases)."""
    return Phases.for_this_process()


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC from Python or from a Rust writer (safetensors reports 'os error 28')."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text
