"""The local executor: fresh pinned child processes on this machine.

One run is one child, or `workers` data-parallel children joined on loopback; a
verification is a pool of runs, under qemu-x86_64 for a run whose spec names an emulated
processor. Same contract as the Ray executor, so the use cases analyse the run directories
the same way whichever executor produced them.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qlorax.executors.base import TrainRequest
from qlorax.executors.emulation import emulation_env, emulator_wrappers
from qlorax.launcher import default_threads, forwarding_signals, launch_training
from qlorax.layout import TRAIN_LOG
from qlorax.runboard import BoardRow, RunBoard
from qlorax.rundir import prepare_output_dir
from qlorax.verify import RunSpec


class LocalExecutor:
    """Processes on this machine (the default)."""

    name = "local"
    supports_resume = True
    supports_emulation = True
    supports_worker_counts = True

    def __init__(self, address: str | None = None, shared_dir: Path | None = None) -> None:
        del address, shared_dir  # a cluster's options: meaningless here

    def default_threads(self, workers: int) -> int:
        """Every core for one process; one thread per worker for data-parallel runs."""
        return default_threads() if workers == 1 else 1

    def capacity(self, threads: int) -> int | None:
        del threads
        return None  # a lost local worker process leaves its cores: restart with as many

    def train_one(self, request: TrainRequest) -> int:
        return launch_training(request.config, request.output_dir, request.threads, resume=request.resume,
                               extra_env=request.extra_env, workers=request.workers, inputs=request.inputs,
                               extras=request.payload_extras())

    def run_many(self, specs: list[RunSpec], jobs: int | None, log_dir: Path, force: bool,
                 extra_env: Mapping[str, str]) -> dict[int, int]:
        return run_local(specs, jobs or 1, log_dir, force, extra_env=dict(extra_env))


def run_local(specs: list[RunSpec], jobs: int, log_dir: Path, force: bool,
              extra_env: dict[str, str] | None = None) -> dict[int, int]:
    """A pool of `jobs` slots, each launching a fresh pinned child process per run
    (fresh processes, so no state of one run can leak into the next), under qemu-x86_64
    for a run whose spec names an emulated processor."""
    wrappers = emulator_wrappers(sorted({spec.cpu for spec in specs}))
    log_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        prepare_output_dir(spec.run_dir, resume=False, force=force)

    board = RunBoard(f"qlorax verify: {len(specs)} runs, {jobs} at a time (logs in {log_dir})",
                     [BoardRow(spec.run_dir.name, f"{spec.threads} / {spec.workers} / {spec.cpu}",
                               log=spec.run_dir / TRAIN_LOG) for spec in specs])

    def one(spec: RunSpec) -> int:
        board.started(spec.run_dir.name)
        with open(log_dir / f"{spec.run_dir.name}.log", "w", encoding="utf-8") as log:
            code = launch_training(spec.config, spec.run_dir, spec.threads, stdout=log, stderr=log,
                                   extra_env={**(extra_env or {}), **emulation_env(spec.cpu)},
                                   wrapper=wrappers[spec.cpu], workers=spec.workers, inputs=spec.inputs,
                                   extras={"storage": spec.storage.to_payload()} if spec.storage else None)
        board.ended(spec.run_dir.name, code)
        return code

    # A signal reaching this process goes to every running child (which checkpoints and stops),
    # and no queued run starts after it. The board shows every run live (qlorax.runboard).
    with forwarding_signals(), board, ThreadPoolExecutor(max_workers=jobs) as pool:
        codes = list(pool.map(one, specs))
    return {spec.index: code for spec, code in zip(specs, codes, strict=True)}
