"""The one interface every executor offers: train one run, run many (a verification).

An executor decides where training processes run; it never decides what they compute: each
run is a pinned child started by the launcher, so the bits do not depend on the executor.
The use cases (qlorax.usecases) pick one from the registry in qlorax.executors by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qlorax.config import QloraxConfig
from qlorax.inputs import ResolvedInputs
from qlorax.storage.store import StorageSpec
from qlorax.verify import RunSpec


@dataclass
class TrainRequest:
    """One training run: the config and its resolved inputs, where it goes, how it is laid out."""

    config: QloraxConfig
    inputs: ResolvedInputs
    output_dir: Path
    threads: int
    workers: int = 1
    resume: bool = False
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # Durable storage rank 0 persists checkpoints to, and the automatic restarts so far.
    storage: StorageSpec | None = None
    restarts: list[dict[str, Any]] = field(default_factory=list)

    def payload_extras(self) -> dict[str, Any]:
        """What the training child gets beside the config: storage (with its credentials, on
        stdin only) and the restarts it records in training_metadata.json."""
        return {"storage": self.storage.to_payload() if self.storage else None, "restarts": list(self.restarts)}


class Executor(Protocol):
    """What `train` and `verify` need of an executor, and what it can do."""

    name: str
    # Whether a run it trained keeps checkpoints that `qlorax resume` can continue.
    supports_resume: bool
    # Whether a verification run may name an emulated processor (--cpu) or several worker counts.
    supports_emulation: bool
    supports_worker_counts: bool

    def default_threads(self, workers: int) -> int:
        """Threads per worker when --threads is not given."""
        ...

    def capacity(self, threads: int) -> int | None:
        """How many workers of `threads` threads can be placed now (None: as many as before):
        a restart after a lost node continues on what remains."""
        ...

    def train_one(self, request: TrainRequest) -> int:
        """Train one run into request.output_dir; returns the exit code."""
        ...

    def run_many(self, specs: list[RunSpec], jobs: int | None, log_dir: Path, force: bool,
                 extra_env: Mapping[str, str]) -> dict[int, int]:
        """Train every spec in a fresh process; returns {run index: exit code}, never raising for a failed run."""
        ...
