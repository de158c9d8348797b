"""`qlorax verify`: run the same training N times in fresh processes, then prove the bits match.

Runs alternate thread counts (1,2 by default) so that one verification also proves thread
invariance. Each run is a fresh child process started by the launcher (local executor) or
a fresh Ray worker process (ray executor); verification runs never use the cache.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorax.config import QloraxConfig
from qlorax.errors import ConfigError


@dataclass
class RunSpec:
    """One verification run: where it goes, its thread count, its config."""

    index: int
    run_dir: Path
    threads: int
    config: QloraxConfig


def parse_threads(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--threads {text!r}: expected comma-separated positive integers, e.g. 1,2") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--threads {text!r}: expected a comma-separated list of positive integers, e.g. 1,2")
    return values


def default_jobs(thread_counts: list[int]) -> int:
    """As many concurrent runs as the cores allow at the smallest thread count."""
    from qlorax.launcher import default_threads

    return max(1, default_threads() // min(thread_counts))


def plan_runs(config: QloraxConfig, output_dir: Path, runs: int, thread_counts: list[int],
              perturbations: dict[int, dict[str, dict[str, Any]]] | None = None) -> list[RunSpec]:
    """run-01..run-N, thread counts cycling through the list; perturbations are test-only."""
    specs = []
    for index in range(1, runs + 1):
        cfg = config
        if perturbations and index in perturbations:
            data = config.canonical()
            for section, values in perturbations[index].items():
                data.setdefault(section, {}).update(values)
            cfg = QloraxConfig.model_validate(data)
        specs.append(RunSpec(index, output_dir / f"run-{index:02d}", thread_counts[(index - 1) % len(thread_counts)],
                             cfg))
    return specs


def run_local(specs: list[RunSpec], jobs: int, log_dir: Path, force: bool,
              extra_env: dict[str, str] | None = None) -> dict[int, int]:
    """A pool of `jobs` slots, each launching a fresh pinned child process per run."""
    from qlorax.launcher import launch_training
    from qlorax.rundir import prepare_output_dir

    log_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        prepare_output_dir(spec.run_dir, resume=False, force=force)

    def one(spec: RunSpec) -> int:
        with open(log_dir / f"{spec.run_dir.name}.log", "w", encoding="utf-8") as log:
            return launch_training(spec.config, spec.run_dir, spec.threads, stdout=log, stderr=log,
                                   extra_env=extra_env)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        codes = list(pool.map(one, specs))
    return {spec.index: code for spec, code in zip(specs, codes, strict=True)}


def summarise(report: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    metrics = report["overall_analysis"]["metrics_reproducibility"]
    adapter = report["overall_analysis"].get("artifact_agreement", {}).get("adapter_model.safetensors", {})
    digests = adapter.get("digests", {})
    reference = max(digests, key=lambda d: len(digests[d])) if digests else None
    return {
        "runs": report["analysis_metadata"]["total_runs_analyzed"],
        "score": metrics["reproducibility_score"],
        "adapter_sha256": reference,
        "report": str(files.get("json")),
        "markdown": str(files.get("markdown")),
        "plot": str(files.get("plot")),
    }
