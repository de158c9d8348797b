"""Use cases: train one run, resume one, verify many, probe the environment.

The CLI parses options, calls one of these, renders what it returns and exits with its
code. Each use case checks its inputs in this process (no torch: config, data, model path,
output directory) before anything is launched or written, then hands the work to a pinned
child process through the launcher, and wraps it with the operational concerns of
`qlorax.runops` (admission, secrets, cache, audit trail, metrics).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlorax import runops, settings
from qlorax.artifacts import load_manifest, read_json
from qlorax.config import QloraxConfig, load_config, parse_config, parse_overrides
from qlorax.data import DataFile, read_data_file
from qlorax.errors import EXIT_CHECK_FAILED, EXIT_SIGINT, EXIT_SIGTERM, ConfigError, OutputError, QloraxError
from qlorax.layout import (
    ADAPTER_WEIGHTS,
    CHECKPOINT_CONFIG,
    CHECKPOINTS_DIR,
    LOGS_DIR,
    LOSS_PLOT,
    MANIFEST,
    METADATA,
    REPORT_CONCLUSIONS,
    REPORT_JSON,
    REPORT_MARKDOWN,
    RESULTS,
    report_get,
    verification_run_name,
)
from qlorax.profiles import get_profile, profile_name_from_env
from qlorax.rundir import RunDirectoryLost, RunLock, prepare_output_dir

EXECUTORS = ("local", "ray")


def resolve_config(config: Path | None, pairs: list[str] | None = None, seed: int | None = None,
                   profile: str | None = None) -> QloraxConfig:
    """The YAML file (or the defaults) with --set overrides, --seed and the profile applied;
    the profile comes from --profile, else $QLORAX_PROFILE, else the file."""
    overrides = parse_overrides(pairs)
    if seed is not None:
        overrides.setdefault("training", {})["seed"] = seed
    chosen = profile or settings.profile_from_env()
    if chosen:
        overrides.setdefault("determinism", {})["profile"] = chosen
    return load_config(config, overrides)


def pin_data_source(config: QloraxConfig) -> QloraxConfig:
    """A git data source named by a tag, a short sha or (with allow_moving_ref) a branch,
    replaced by its full commit sha: the training process, the recorded config and a later
    `qlorax resume` then read exactly the commit this process resolved, even if the ref moves."""
    from qlorax.datasource import is_git_source, pinned_spec

    if not is_git_source(config.data.path):
        return config
    form = config.canonical()
    form["data"]["path"] = pinned_spec(config.data.path, config.data.allow_moving_ref)
    return parse_config(form, "resolved config")


def check_inputs(config: QloraxConfig) -> DataFile:
    """Fail fast, before launching: the data file parses and the model path exists."""
    from qlorax.model import local_model_dir

    data = read_data_file(config.data)
    local_model_dir(config.model)
    return data


@dataclass
class TrainOutcome:
    """What `train_one` did: the child's exit code, and whether the cache answered instead."""

    exit_code: int
    output_dir: Path
    cache_hit: bool = False
    cache_key: str | None = None
    finished: bool = False  # resume found a run that had already finished (nothing was trained)
    problems: list[str] = field(default_factory=list)  # ... and what fails its manifest


def check_workers(config: QloraxConfig, workers: int) -> None:
    """Data-parallel training shares out each step's micro-batches: more workers than
    gradient_accumulation_steps would leave some idle (and is refused, exit 2)."""
    accumulation = config.training.gradient_accumulation_steps
    if workers > accumulation:
        raise ConfigError(f"--workers {workers}: training.gradient_accumulation_steps is {accumulation}, and the "
                          f"workers share out each optimizer step's {accumulation} micro-batch(es), so at most "
                          f"{accumulation} worker(s) can train this config. Raise gradient_accumulation_steps (and "
                          "lower batch_size to keep the effective batch) or use fewer workers.")


def train_one(config: QloraxConfig, output_dir: Path, threads: int | None, *, resume: bool = False,
              force: bool = False, options: runops.RunOptions | None = None, workers: int = 1,
              executor: str = "local", address: str | None = None, shared_dir: Path | None = None) -> TrainOutcome:
    """One run: check inputs, consult the cache, admit, train in pinned children (one, or
    `workers` data-parallel ones of `threads` threads each, 1 by default; on this machine or
    placed by Ray), record."""
    from qlorax.launcher import default_threads, launch_training

    options = options or runops.RunOptions(use_cache=False)
    check_workers(config, workers)
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: expected {' or '.join(EXECUTORS)}")
    if executor == "ray" and resume:
        raise ConfigError("--executor ray: a Ray-placed run keeps no checkpoints (they are removed with rank 0's "
                          "working directory), so it cannot be resumed; train it again, or train locally with "
                          "--workers to be able to resume")
    config = pin_data_source(config)
    secrets = runops.secret_environment(options)
    runops.refuse_secrets_in_config(config)
    data = check_inputs(config)
    runops.check_tracking(options)
    key = runops.cache_key(config, data.sha256) if options.use_cache and not resume else None
    cached = key is not None and runops.cached_run_available(key)
    if not cached:
        runops.admit_run(options)  # before anything is written: a refused run leaves nothing behind
    prepare_output_dir(output_dir, resume=resume, force=force)
    audit = runops.audit_logger(options, output_dir.resolve().parent)
    audit.log_training_start(runops.redacted_config(config), config.config_hash(), output_dir)
    cache_hit = cached and runops.restore_from_cache(key, output_dir)
    if cache_hit:
        code = 0
    else:
        threads = threads or (default_threads() if workers == 1 and executor == "local" else 1)
        if executor == "ray":
            from qlorax.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S
            from qlorax.executors.ray_workers import train_on_ray

            prepare_base_model(config, secrets)
            code = train_on_ray(config, output_dir, threads, workers, address=address, shared_dir=shared_dir,
                                timeout_s=DEFAULT_COLLECTIVE_TIMEOUT_S)
            if code != 0:  # say so in the directory, as a local run does (never over a manifest)
                from qlorax.jobs.train import mark_failed

                mark_failed(output_dir, f"the Ray-placed run failed (exit {code}); see the lines printed above")
        else:
            code = launch_training(config, output_dir, threads, resume=resume, extra_env=secrets, workers=workers)
        if code == 0 and not (output_dir / MANIFEST).is_file():  # deleted between the child's exit and now
            raise RunDirectoryLost(output_dir)
        if code == 0 and key is not None:
            runops.store_in_cache(key, output_dir)
    runops.log_run_outcome(audit, output_dir, code, cache_hit)
    runops.record_metrics(options, [output_dir], [code])
    runops.record_tracking(options, [output_dir], [code])
    return TrainOutcome(code, output_dir, cache_hit, key)


def recorded_config(run_dir: Path) -> QloraxConfig:
    """The config an interrupted run recorded beside its checkpoints (what resume continues)."""
    from qlorax.checkpoint import list_checkpoints

    if not list_checkpoints(run_dir):
        status = (runops.read_status(run_dir) or "no training_metadata.json")
        raise OutputError(f"{run_dir} never started training: it holds no checkpoint and no finished run (status: "
                          f"{status}), so there is nothing to resume. Start it with `qlorax train --output-dir "
                          f"{run_dir}`.")
    config_path = Path(run_dir) / CHECKPOINTS_DIR / CHECKPOINT_CONFIG
    if not config_path.is_file():
        raise OutputError(f"{run_dir} does not record its config ({config_path} is missing)")
    return parse_config(read_json(config_path)["config"], str(config_path))


def resume_run(run_dir: Path, threads: int | None, options: runops.RunOptions | None = None,
               workers: int = 1) -> TrainOutcome:
    """Continue an interrupted run from its newest valid checkpoint, with its recorded config
    (and the same audit, metrics and admission options as `train`).

    Restarts (a pod, auto_recovery.sh) call resume again after a run finished: a finished run
    whose files match its manifest is exit 0 with nothing to do, one that fails its manifest
    exit 1 naming what differs; a directory that never reached a checkpoint is exit 2 saying so.
    Any number of workers may continue a checkpoint made with another: the state is the same."""
    from qlorax.rundir import lock_holder

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OutputError(f"{run_dir}: no such run directory to resume")
    holder = lock_holder(run_dir)
    if holder is not None:
        raise OutputError(f"{run_dir} is in use by a running qlorax process (pid {holder}); it is not interrupted")
    if (run_dir / MANIFEST).exists():
        from qlorax.analysis.runs import integrity_problems, verify_run_dir

        problems = integrity_problems(verify_run_dir(run_dir))
        return TrainOutcome(EXIT_CHECK_FAILED if problems else 0, run_dir, finished=True, problems=problems)
    return train_one(recorded_config(run_dir), run_dir, threads, resume=True, options=options, workers=workers)


def run_summary(output_dir: Path) -> list[tuple[str, str]]:
    """Rows describing a finished run: losses, steps, speed, adapter and deterministic digests."""
    results = read_json(output_dir / RESULTS)
    manifest = load_manifest(output_dir) or {}
    metadata = read_json(output_dir / METADATA)
    first, last = results["initial_train_loss"], results["train_loss"]
    return [
        ("train loss (first → last window)", f"{first:.4f} → {last:.4f}"),
        ("eval loss / perplexity", f"{results['eval_loss']:.4f} / {results['eval_perplexity']:.2f}"),
        ("steps / tokens", f"{results['steps']} / {results['train_tokens']}"),
        ("tokens/s", str(metadata.get("tokens_per_second"))),
        ("adapter sha256", manifest.get("files", {}).get(ADAPTER_WEIGHTS, {}).get("sha256", "?")),
        ("deterministic digest", manifest.get("deterministic_digest", "?")),
    ]


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


def verify_many(config: QloraxConfig, output_dir: Path, runs: int, thread_counts: list[int], *,
                jobs: int | None = None, executor: str = "local", address: str | None = None,
                shared_dir: Path | None = None, force: bool = False,
                options: runops.RunOptions | None = None, cpus: list[str] | None = None,
                worker_counts: list[int] | None = None) -> VerifyOutcome:
    """N independent runs of one config (thread counts, processors and worker counts
    alternating), then the analysis."""
    from qlorax.verify import plan_runs

    options = options or runops.RunOptions(use_cache=False)
    worker_counts = worker_counts or [1]
    check_workers(config, max(worker_counts))
    config = pin_data_source(config)
    secrets = runops.secret_environment(options)
    runops.refuse_secrets_in_config(config)
    check_inputs(config)
    runops.check_tracking(options)
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: expected {' or '.join(EXECUTORS)}")
    cpus = cpus or ["native"]
    if cpus != ["native"]:
        from qlorax.probe import check_processors

        if executor != "local":
            raise ConfigError(f"--cpu {','.join(cpus)}: emulated processors run on the local executor only")
        check_processors(config, cpus)  # a processor the profile refuses fails now, not after hours
    if worker_counts != [1] and executor != "local":
        raise ConfigError(f"--workers {','.join(map(str, worker_counts))}: verification runs with several workers "
                          "run on the local executor only (`qlorax train --executor ray --workers N` trains one run "
                          "on a Ray cluster)")
    specs = plan_runs(config, output_dir, runs, thread_counts, cpus, worker_counts)
    runops.admit_run(options)
    # One verification per directory, like one run per run directory: a second one is exit 2
    # naming the live holder, before it writes a log or a run there.
    lock = RunLock(output_dir).acquire()
    try:
        if lock.warning:
            print(f"warning: {lock.warning}", file=sys.stderr, flush=True)
        return _verify_locked(config, output_dir, specs, thread_counts, worker_counts, jobs=jobs, executor=executor,
                              address=address, shared_dir=shared_dir, force=force, options=options, secrets=secrets)
    finally:
        lock.release()


def _verify_locked(config: QloraxConfig, output_dir: Path, specs: list[Any], thread_counts: list[int],
                   worker_counts: list[int], *,
                   jobs: int | None, executor: str, address: str | None, shared_dir: Path | None, force: bool,
                   options: runops.RunOptions, secrets: dict[str, str]) -> VerifyOutcome:
    """verify_many's work once it holds the verification directory: train, then analyse its own runs only."""
    from qlorax.analysis import analyze_runs, write_reports
    from qlorax.verify import default_jobs, summarise

    prepare_base_model(config, secrets)
    log_dir = output_dir / LOGS_DIR
    if executor == "local":
        from qlorax.executors.local import run_local

        codes = run_local(specs, jobs or default_jobs(thread_counts, worker_counts=worker_counts), log_dir, force,
                          extra_env=secrets)
    else:
        from qlorax.executors.ray import run_ray

        codes = run_ray(specs, jobs, log_dir, force, address=address, shared_dir=shared_dir)
    for name in (REPORT_JSON, REPORT_MARKDOWN, LOSS_PLOT):  # an earlier report describes runs now replaced
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
    report = analyze_runs(run_dirs, exit_codes=[codes[spec.index] for spec in specs])
    files = write_reports(report, run_dirs, output_dir)
    summary = summarise(report, files)
    audit = runops.audit_logger(options, output_dir)
    audit.log_verification({**summary, "config_hash": config.config_hash(),
                            "conclusions": report_get(report, REPORT_CONCLUSIONS, [])})
    runops.record_metrics(options, [s.run_dir for s in specs], [codes[s.index] for s in specs], summary["score"])
    runops.record_tracking(options, [s.run_dir for s in specs], [codes[s.index] for s in specs], report,
                           files.get("json"))
    return VerifyOutcome(codes, report, summary, log_dir, [i for i, c in sorted(codes.items()) if c != 0])


def prepare_base_model(config: QloraxConfig, extra_env: dict[str, str] | None = None) -> None:
    """Build a preset or GGUF base model once, in a pinned child, before parallel runs start."""
    from qlorax.launcher import default_threads, launch_job
    from qlorax.model import materialisation_pending

    if not materialisation_pending(config.model):
        return
    code = launch_job("prepare", {"config": config.canonical()}, config.determinism.profile, default_threads(),
                      extra_env=extra_env)
    if code != 0:
        raise QloraxError(f"could not build the base model {config.model.name_or_path} (exit {code})", exit_code=code)


def environment_report(profile: str | None, threads: int | None) -> dict[str, Any]:
    """The fingerprint and validation a training process would see, from a pinned `env` child."""
    from qlorax.launcher import default_threads, run_job_captured

    chosen = get_profile(profile_name_from_env(profile))
    done = run_job_captured("env", {}, chosen.name, threads or default_threads())
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise QloraxError(f"the environment probe failed: {lines[-1] if lines else 'no message'}",
                          exit_code=EXIT_CHECK_FAILED)
    return json.loads(done.stdout)
