"""What one training process holds: the job the launcher handed it, and the state set-up
builds for the loop and the finish (train.py's recipe and run_outputs.py's writers share it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlorax.artifacts import utc_now
from qlorax.checkpoint import TrainingProgress
from qlorax.config import QloraxConfig
from qlorax.data import Dataset
from qlorax.distributed import World
from qlorax.inputs import ResolvedInputs, resolve_inputs
from qlorax.micro_batches import ONE_AT_A_TIME, MicroBatchPool
from qlorax.model import BaseModelInfo
from qlorax.storage.runs import Upload
from qlorax.storage.store import RunStore, StorageSpec

if TYPE_CHECKING:  # qlorax.dropout imports torch; the run state is also read where torch is not loaded
    from qlorax.dropout import DropoutStream


@dataclass
class TrainingJob:
    """What the launcher hands the child process."""

    config: QloraxConfig
    output_dir: Path
    threads: int
    resume: bool = False
    removed_env: list[str] = field(default_factory=list)
    # Raises when the run directory is no longer this job's (deleted under it); called before
    # every write that would otherwise make the directory again (qlorax.rundir.RunLock.check).
    check_ownership: Callable[[], None] = lambda: None
    # This process's rank among the run's workers; only rank 0 writes into output_dir.
    world: World = field(default_factory=World)
    executor: str = "local"
    # Informational facts of the executor that placed the run (e.g. Ray's authentication mode).
    executor_facts: dict[str, Any] = field(default_factory=dict)
    # The identities and config hash the parent resolved (qlorax.inputs); resolved here when absent.
    inputs: ResolvedInputs | None = None
    # Durable storage rank 0 persists every checkpoint to (None: the run directory only).
    storage: StorageSpec | None = None
    # Automatic restarts before this attempt (time, cause, world sizes): training_metadata.json.
    restarts: list[dict[str, Any]] = field(default_factory=list)

    def resolved_inputs(self) -> ResolvedInputs:
        if self.inputs is None:
            self.inputs = resolve_inputs(self.config)
        return self.inputs


class RunLog:
    """train.log (informational), flushed per line so a crash keeps it; None for a worker
    other than rank 0, which writes nothing into the run directory."""

    def __init__(self, path: Path | None):
        self.handle = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 - lives as long as the run

    def write(self, message: str) -> None:
        if self.handle and not self.handle.closed:  # closed: the run stopped on a signal, its log is complete
            self.handle.write(f"{utc_now()} {message}\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle:
            self.handle.close()


@dataclass
class TrainingState:
    """Everything set_up builds and the loop and finish use."""

    job: TrainingJob
    log: RunLog
    validation: tuple[bool, list[str]]
    base: BaseModelInfo
    tokenizer: Any
    model: Any
    # The LoRA dropout's mask stream (qlorax.dropout): begin(micro-batch) before each forward.
    dropout: DropoutStream
    data: Dataset
    trainable: list[Any]
    optimizer: Any
    scheduler: Any
    progress: TrainingProgress
    # Optimizer steps and warmup steps of the whole run (resolve_steps: max_steps or num_epochs).
    total_steps: int = 0
    warmup_steps: int = 0
    resumed_from: int | None = None
    # A 4-bit base's digest (packed weights and quant state), recorded in env.json's fingerprint.
    quantized_base_sha256: str | None = None
    # The steps this process ran (a resumed run counts only its own), for tokens/s.
    loop_seconds: float = 0.0
    loop_tokens: int = 0
    # Of loop_seconds, the time spent in collectives (sending, receiving, waiting for the slowest
    # worker): the communication share of a data-parallel run; 0 with one worker.
    collective_seconds: float = 0.0
    # Rank 0's durable store (job.storage opened) and what this process uploaded to it.
    store: RunStore | None = None
    uploaded: Upload = field(default_factory=Upload)
    checkpoints_uploaded: int = 0
    # Computes this worker's micro-batches of a step side by side (qlorax.micro_batches).
    micro_batch_pool: MicroBatchPool = ONE_AT_A_TIME
