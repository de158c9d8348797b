"""The local executor for `qlorax verify`: one fresh pinned child process per run, on this machine.

Same contract as `qlorax.executors.ray.run_ray` (RunSpecs in, {run index: exit code} out), so
the CLI analyses the run directories the same way whichever executor produced them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qlorax.verify import RunSpec


def run_local(specs: list[RunSpec], jobs: int, log_dir: Path, force: bool,
              extra_env: dict[str, str] | None = None) -> dict[int, int]:
    """A pool of `jobs` slots, each launching a fresh pinned child process per run
    (fresh processes, so no state of one run can leak into the next), under qemu-x86_64
    for a run whose spec names an emulated processor."""
    from qlorax.launcher import forwarding_signals, launch_training
    from qlorax.probe import emulation_env, emulator_wrappers
    from qlorax.rundir import prepare_output_dir

    wrappers = emulator_wrappers(sorted({spec.cpu for spec in specs}))
    log_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        prepare_output_dir(spec.run_dir, resume=False, force=force)

    def one(spec: RunSpec) -> int:
        with open(log_dir / f"{spec.run_dir.name}.log", "w", encoding="utf-8") as log:
            return launch_training(spec.config, spec.run_dir, spec.threads, stdout=log, stderr=log,
                                   extra_env={**(extra_env or {}), **emulation_env(spec.cpu)},
                                   wrapper=wrappers[spec.cpu], workers=spec.workers)

    # A signal reaching this process goes to every running child (which checkpoints and stops),
    # and no queued run starts after it.
    with forwarding_signals(), ThreadPoolExecutor(max_workers=jobs) as pool:
        codes = list(pool.map(one, specs))
    return {spec.index: code for spec, code in zip(specs, codes, strict=True)}
