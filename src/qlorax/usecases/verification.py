"""Use case: verify many — N independent runs of one config, then the analysis.

Runs alternate thread counts, worker counts and (locally) emulated processors, so one
verification also proves the bits do not depend on them; the executor decides where the
runs go. Only runs whose process exited 0 are analysed; a failed one counts against the score.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qlorax.analysis import analyze_runs, write_reports
from qlorax.config import QloraxConfig
from qlorax.errors import EXIT_SIGINT, EXIT_SIGTERM, ConfigError, QloraxError
from qlorax.executors import Executor, get_executor
from qlorax.executors.emulation import check_processors
from qlorax.inputs import ResolvedInputs
from qlorax.layout import (
    LOGS_DIR,
    LOSS_PLOT,
    REPORT_CONCLUSIONS,
    REPORT_JSON,
    REPORT_MARKDOWN,
    report_get,
    verification_run_name,
)
from qlorax.phases import announce
from qlorax.rundir import RunLock
from qlorax.storage.store import RunStore
from qlorax.usecases import durable, runops
from qlorax.usecases.prelaunch import prepare_launch
from qlorax.usecases.training import prepare_base_model
from qlorax.verify import RunSpec, default_jobs, plan_runs, summarise


@dataclass
class VerifyOutcome:
    """Exit codes per run, the analysis report and its summary."""

    exit_codes: dict[int, int]
    report: dict[str, Any]
    summary: dict[str, Any]
    log_dir: Path
    failed_runs: list[int] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.summary["score"] == 1.0 else 1


def check_layout(runner: Executor, cpus: list[str], worker_counts: list[int]) -> None:
    """What the executor can alternate: emulated processors and worker counts run locally only."""
    if cpus != ["native"] and not runner.supports_emulation:
        raise ConfigError(f"--cpu {','.join(cpus)}: emulated processors run on the local executor only")
    if worker_counts != [1] and not runner.supports_worker_counts:
        raise ConfigError(f"--workers {','.join(map(str, worker_counts))}: verification runs with several workers "
                          "run on the local executor only (`qlorax train --executor ray --workers N` trains one run "
                          "on a Ray cluster)")


def verify_many(config: QloraxConfig, output_dir: Path, runs: int, thread_counts: list[int], *,
                jobs: int | None = None, executor: str = "local", address: str | None = None,
                shared_dir: Path | None = None, force: bool = False,
                options: runops.RunOptions | None = None, cpus: list[str] | None = None,
                worker_counts: list[int] | None = None, storage: str | None = None) -> VerifyOutcome:
    """N independent runs of one config (thread counts, processors and worker counts
    alternating), then the analysis. With `storage`, every run is durable (URI/run-XX): its
    checkpoints persisted as written, so a Ray task retried after a lost node continues its run."""
    options = options or runops.RunOptions(use_cache=False)
    worker_counts, cpus = worker_counts or [1], cpus or ["native"]
    launch = prepare_launch(config, options, max(worker_counts))
    runner = get_executor(executor, address=address, shared_dir=shared_dir)
    check_layout(runner, cpus, worker_counts)
    if cpus != ["native"]:
        check_processors(launch.config, cpus)  # a processor the profile refuses fails now, not after hours
    specs = plan_runs(launch.config, output_dir, runs, thread_counts, cpus, worker_counts, launch.inputs)
    root = durable.open_store(storage) if storage else None
    if runner.name == "local":
        jobs = jobs or default_jobs(thread_counts, worker_counts=worker_counts)
    runops.admit_run(options)
    # One verification per directory, like one run per run directory: a second one is exit 2
    # naming the live holder, before it writes a log or a run there.
    lock = RunLock(output_dir).acquire()
    try:
        if lock.warning:
            print(f"warning: {lock.warning}", file=sys.stderr, flush=True)
        prepare_base_model(launch.config, launch.secrets)
        if root is not None:
            stored = durable.verification_runs_durably(root, launch.config, launch.inputs,
                                                       [spec.run_dir.name for spec in specs])
            specs = [replace(spec, storage=where) for spec, where in zip(specs, stored, strict=True)]
        codes = runner.run_many(specs, jobs, output_dir / LOGS_DIR, force, launch.secrets)
        for spec in specs:
            if spec.storage is not None and codes[spec.index] == 0:
                durable.finish_durably(RunStore(spec.storage), spec.run_dir)
        announce(f"analysis: comparing the {len(specs)} runs' digests, traces and tensors")
        return _analyse(launch.inputs, output_dir, specs, codes, options)
    finally:
        lock.release()


def _analyse(inputs: ResolvedInputs, output_dir: Path, specs: list[RunSpec], codes: dict[int, int],
             options: runops.RunOptions) -> VerifyOutcome:
    """The runs are trained: analyse this verification's own runs and record the outcome."""
    from qlorax.analysis.html import REPORT_HTML, write_html

    for name in (REPORT_JSON, REPORT_MARKDOWN, LOSS_PLOT, REPORT_HTML):  # an earlier report describes runs now replaced
        (output_dir / name).unlink(missing_ok=True)
    interrupted = sorted({code for code in codes.values() if code in (EXIT_SIGINT, EXIT_SIGTERM)})
    if interrupted:
        stopped = [verification_run_name(i) for i, c in sorted(codes.items()) if c in interrupted]
        raise QloraxError(f"verification in {output_dir} interrupted (exit {interrupted[-1]}): "
                          f"{', '.join(stopped)} stopped; no report was written. A stopped run that wrote a checkpoint "
                          "continues with `qlorax resume RUN_DIR`; or run the verification again with --force.",
                          exit_code=interrupted[-1])
    # Only the runs whose process exited 0 here are analysed; a failed one counts against the score
    # unread (its directory may hold another process's run).
    run_dirs = [spec.run_dir for spec in specs]
    exit_codes = [codes[spec.index] for spec in specs]
    report = analyze_runs(run_dirs, exit_codes=exit_codes)
    files = write_reports(report, run_dirs, output_dir)
    files["html"] = write_html(output_dir, report=report)  # the page to look at, beside the JSON report
    summary = summarise(report, files)
    audit = runops.audit_logger(options, output_dir)
    audit.log_verification({**summary, "config_hash": inputs.config_hash,
                            "conclusions": report_get(report, REPORT_CONCLUSIONS, [])})
    runops.record_metrics(options, run_dirs, exit_codes, summary["score"])
    runops.record_tracking(options, run_dirs, exit_codes, report, files.get("json"))
    return VerifyOutcome(codes, report, summary, output_dir / LOGS_DIR, [i for i, c in sorted(codes.items()) if c != 0])
