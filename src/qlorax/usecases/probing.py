"""Use case: `qlorax probe` — the first training step on each processor, compared bit for bit.

Native runs first and alone (it is the reference, and bad input shows there in seconds),
then every emulated processor (qlorax.executors.emulation); qlorax.probe compares.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qlorax.artifacts import read_json, write_json_atomic
from qlorax.config import QloraxConfig
from qlorax.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_RESOURCES, QloraxError
from qlorax.executors.emulation import emulation_env, emulator_wrappers
from qlorax.launcher import default_threads, launch_job
from qlorax.probe import (
    NATIVE,
    PROBE_LOGS,
    PROBE_REPORT,
    ProbeOutcome,
    ProcessorRun,
    build_report,
    last_error_line,
    probe_config,
    result_path,
)
from qlorax.usecases.prelaunch import check_inputs
from qlorax.usecases.training import prepare_base_model


def run_processors(config: QloraxConfig, cpus: list[str], wrappers: dict[str, tuple[str, ...]], output_dir: Path,
                   threads: int, jobs: int) -> dict[str, ProcessorRun]:
    """Launch the `probe` job once per processor, `jobs` at a time, each in a fresh pinned child;
    stale results of an earlier probe are removed first, so a failure cannot pass as a result."""

    log_dir = output_dir / PROBE_LOGS
    log_dir.mkdir(parents=True, exist_ok=True)
    for cpu in cpus:
        for stale in (result_path(output_dir, cpu), result_path(output_dir, cpu).with_suffix(".safetensors")):
            stale.unlink(missing_ok=True)

    def one(cpu: str) -> ProcessorRun:
        log = log_dir / f"{cpu}.log"
        payload = {"config": config.canonical(), "result": str(result_path(output_dir, cpu).resolve())}
        start = time.perf_counter()
        with open(log, "w", encoding="utf-8") as handle:
            code = launch_job("probe", payload, config.determinism.profile, threads, extra_env=emulation_env(cpu),
                              stdout=handle, stderr=handle, wrapper=wrappers[cpu])
        run = ProcessorRun(cpu, code, round(time.perf_counter() - start, 1), log)
        written = read_json(result_path(output_dir, cpu)) if result_path(output_dir, cpu).is_file() else None
        if code == 0 and written is not None:
            run.record = written
        elif written is not None and "refused" in written:
            run.refusal = written
            run.message = written["refused"]
        else:
            run.message = last_error_line(log) or f"exit {code}; see {log}"
        return run

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        runs = list(pool.map(one, cpus))
    return {run.cpu: run for run in runs}




def run_probe(config: QloraxConfig, cpus: list[str], output_dir: Path, batch: tuple[int, int], threads: int = 1,
              jobs: int | None = None) -> ProbeOutcome:
    """Probe every processor (native always first: it is the reference), compare, write the report."""

    cpus = [NATIVE, *[cpu for cpu in cpus if cpu != NATIVE]]
    wrappers = emulator_wrappers(cpus)
    config = probe_config(config, batch)
    check_inputs(config)
    prepare_base_model(config)  # natively, once: an emulated child would build it ~100x slower
    # Native first and alone: it is the reference, and bad input (data, model, a batch too short
    # for any completion token) shows there in seconds rather than after minutes of emulation.
    runs = run_processors(config, [NATIVE], wrappers, Path(output_dir), threads, 1)
    native = runs[NATIVE]
    if native.record is None:
        code = native.exit_code if native.exit_code in (EXIT_BAD_INPUT, EXIT_RESOURCES) else EXIT_CHECK_FAILED
        raise QloraxError(f"the native probe failed, so no processor was emulated: {native.message}", exit_code=code)
    runs.update(run_processors(config, cpus[1:], wrappers, Path(output_dir), threads,
                               jobs or max(1, default_threads() // threads)))
    report, rows = build_report(config.determinism.profile, batch, runs, Path(output_dir))
    report_path = Path(output_dir) / PROBE_REPORT
    write_json_atomic(report_path, report)
    return ProbeOutcome(runs, report, report_path, rows)
