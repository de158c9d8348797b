"""Automatic recovery (`--max-restarts N`, `--min-workers M`): a run that loses a worker
process, or a node, restarts by itself from its newest checkpoint on the resources still
there, with no one at the keyboard.

Any number of workers continues any checkpoint with the same bits (qlorax.distributed), so
a restart with fewer workers finishes with the adapter of an uninterrupted one-worker run.
Restarts are for losses: bad input (exit 2) or a stop the user asked for (130, 143 with the
parent signalled) end the run at once. Every restart is recorded (time, cause, world size
before and after) in the audit log, in training_metadata.json (through the job payload) and,
from there, in Prometheus' reproducible_training_restarts_total.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qlorax.artifacts import read_json, utc_now
from qlorax.errors import EXIT_BAD_INPUT, EXIT_SIGINT, EXIT_SIGTERM, ConfigError, ResourceError
from qlorax.executors import TrainRequest
from qlorax.launcher import stop_requested
from qlorax.layout import METADATA


@dataclass(frozen=True)
class RecoveryPolicy:
    """How many automatic restarts a run may use, and the fewest workers it may continue on."""

    max_restarts: int = 0
    min_workers: int | None = None

    def check(self, workers: int, checkpoints_every: int, max_steps: int) -> None:
        """Exit 2 for a policy that cannot work: more workers required than asked for, or
        restarts of a run that writes no checkpoint before it ends (it would start over)."""
        if self.min_workers is not None and self.min_workers > workers:
            raise ConfigError(f"--min-workers {self.min_workers} is above --workers {workers}: a run cannot "
                              "continue on more workers than it started with")
        if self.max_restarts and (checkpoints_every <= 0 or checkpoints_every >= max_steps > 0):
            raise ConfigError(f"--max-restarts {self.max_restarts} needs checkpoints to restart from, but "
                              f"training.save_steps={checkpoints_every} writes none before the last of the "
                              f"{max_steps} steps; set training.save_steps below training.max_steps")


def restartable(code: int) -> bool:
    """A loss worth a restart: not success, not bad input, not a stop the user asked for."""
    if code in (0, EXIT_BAD_INPUT):
        return False
    return not (code in (EXIT_SIGINT, EXIT_SIGTERM) and stop_requested())


def failure_cause(run_dir: Path, code: int) -> str:
    """Why the attempt ended, in the words the run recorded (training_metadata.json), else its code."""
    try:
        recorded = read_json(Path(run_dir) / METADATA)
    except (OSError, ValueError):
        recorded = {}
    error = recorded.get("error") if isinstance(recorded, dict) and recorded.get("status") != "complete" else None
    return f"exit {code}: {error}" if error else f"exit {code}"


def train_with_recovery(runner: Any, request: TrainRequest, policy: RecoveryPolicy, audit: Any) -> int:
    """Train, restarting after a loss up to policy.max_restarts times from the newest
    checkpoint, on as many workers as the executor still has room for (never fewer than
    min_workers); returns the last attempt's exit code. Running out of restarts, or of
    workers, is exit 3 naming every restart's cause."""
    restarts: list[dict[str, Any]] = []
    while True:
        code = runner.train_one(replace(request, restarts=list(restarts)))
        if not restartable(code) or policy.max_restarts == 0:
            return code
        cause = failure_cause(request.output_dir, code)
        if len(restarts) >= policy.max_restarts:
            raise ResourceError(f"the run failed {len(restarts) + 1} times, more than --max-restarts "
                                f"{policy.max_restarts} allows: {_causes(restarts, cause)}; its checkpoints are kept: "
                                f"`qlorax resume {request.output_dir}` continues it")
        room = runner.capacity(request.threads)
        workers = min(request.workers, room) if room is not None else request.workers
        if workers < (policy.min_workers or 1):
            raise ResourceError(f"the run lost workers and only {workers} can be placed now, below --min-workers "
                                f"{policy.min_workers}: {_causes(restarts, cause)}; its checkpoints are kept")
        record = {"time": utc_now(), "cause": cause, "workers_before": request.workers, "workers_after": workers}
        restarts.append(record)
        audit.log_event("training_restart", output_dir=str(request.output_dir), restart=len(restarts), **record)
        print(f"restart {len(restarts)} of at most {policy.max_restarts}: {cause}; continuing from the newest "
              f"checkpoint with {workers} worker(s)", file=sys.stderr, flush=True)
        # The failed attempt's record is read: the next attempt writes its own (and a failure of
        # it must not inherit this one's words).
        (Path(request.output_dir) / METADATA).unlink(missing_ok=True)
        request = replace(request, resume=True, workers=workers)


def _causes(restarts: list[dict[str, Any]], last: str) -> str:
    earlier = [f"{i}. {r['cause']}" for i, r in enumerate(restarts, 1)]
    return "; ".join([*earlier, f"{len(restarts) + 1}. {last}"])
