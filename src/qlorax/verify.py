"""`qlorax verify`: run the same training N times in fresh processes, then prove the bits match.

Runs alternate thread counts (1,2 by default) so that one verification also proves thread
invariance, and with --cpu they alternate processors too (native and QEMU-emulated ones,
see qlorax.probe: ~100x slower per step, for tiny configs only). Each run is a fresh child
process started by the launcher (local executor) or a fresh Ray worker process (ray
executor); verification runs never use the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorax import settings
from qlorax.config import QloraxConfig
from qlorax.errors import ConfigError
from qlorax.inputs import ResolvedInputs
from qlorax.layout import (
    ADAPTER_WEIGHTS,
    REPORT_ARTIFACT_AGREEMENT,
    REPORT_SCORE,
    REPORT_TOTAL_RUNS,
    report_get,
    verification_run_name,
)
from qlorax.storage.store import StorageSpec


@dataclass
class RunSpec:
    """One verification run: where it goes, its thread count, its config, its processor
    (`native`, or a CPU model the local executor runs under qemu-x86_64)."""

    index: int
    run_dir: Path
    threads: int
    config: QloraxConfig
    cpu: str = "native"
    workers: int = 1  # data-parallel worker processes, `threads` threads each
    inputs: ResolvedInputs | None = None  # resolved once by the parent (qlorax.inputs)
    storage: StorageSpec | None = None  # this run's durable copy (verify --storage URI: URI/run-XX)


def parse_threads(text: str, option: str = "--threads") -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated positive integers, e.g. 1,2") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{option} {text!r}: expected a comma-separated list of positive integers, e.g. 1,2")
    return values


def default_jobs(thread_counts: list[int], cores: int | None = None, worker_counts: list[int] | None = None) -> int:
    """As many concurrent runs as fit the cores without oversubscribing them: runs use up to
    max(thread_counts) x max(worker_counts) threads each, so jobs x that <= cores (at least one
    job). Oversubscribed OpenMP threads spin on cores they lost: a run slows 10-30x."""
    if cores is None:
        cores = settings.usable_cores()
    return max(1, cores // (max(thread_counts) * max(worker_counts or [1])))


def plan_runs(config: QloraxConfig, output_dir: Path, runs: int, thread_counts: list[int],
              cpus: list[str] | None = None, worker_counts: list[int] | None = None,
              inputs: ResolvedInputs | None = None) -> list[RunSpec]:
    """run-01..run-N, thread counts, processors and worker counts each cycling through their list."""
    cpus, worker_counts = cpus or ["native"], worker_counts or [1]
    return [RunSpec(index, output_dir / verification_run_name(index), thread_counts[(index - 1) % len(thread_counts)],
                    config, cpus[(index - 1) % len(cpus)], worker_counts[(index - 1) % len(worker_counts)], inputs)
            for index in range(1, runs + 1)]


def summarise(report: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    adapter = report_get(report, REPORT_ARTIFACT_AGREEMENT, {}).get(ADAPTER_WEIGHTS, {})
    digests = adapter.get("digests", {})
    reference = max(digests, key=lambda d: len(digests[d])) if digests else None
    return {
        "runs": report_get(report, REPORT_TOTAL_RUNS),
        "score": report_get(report, REPORT_SCORE),
        "adapter_sha256": reference,
        "report": str(files.get("json")),
        "markdown": str(files.get("markdown")),
        "plot": str(files.get("plot")),
        "page": str(files.get("html")),
    }
