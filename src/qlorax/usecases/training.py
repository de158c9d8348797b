"""Use cases: train one run, resume one, and what the CLI shows of a finished run.

Each checks its inputs here once (qlorax.usecases.prelaunch: no torch), then hands the run
to an executor (qlorax.executors: local processes or a Ray cluster) and wraps it with the
operational concerns of qlorax.usecases.runops (admission, cache, audit trail, metrics).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlorax import settings
from qlorax.analysis.runs import integrity_problems, verify_run_dir
from qlorax.artifacts import load_manifest, read_json
from qlorax.checkpoint import list_checkpoints, record_or_check_config
from qlorax.config import QloraxConfig, load_config, parse_config, parse_overrides
from qlorax.errors import EXIT_CHECK_FAILED, ConfigError, OutputError, QloraxError
from qlorax.executors import TrainRequest, get_executor
from qlorax.launcher import default_threads, launch_job, run_job_captured
from qlorax.layout import ADAPTER_WEIGHTS, CHECKPOINT_CONFIG, CHECKPOINTS_DIR, MANIFEST, METADATA, RESULTS
from qlorax.model import materialisation_pending
from qlorax.profiles import get_profile, profile_name_from_env
from qlorax.rundir import RunDirectoryLost, lock_holder, mark_failed, prepare_output_dir
from qlorax.usecases import durable, runops
from qlorax.usecases.prelaunch import prepare_launch
from qlorax.usecases.recovery import RecoveryPolicy, train_with_recovery


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


@dataclass
class TrainOutcome:
    """What `train_one` did: the child's exit code, and whether the cache answered instead."""

    exit_code: int
    output_dir: Path
    cache_hit: bool = False
    cache_key: str | None = None
    finished: bool = False  # resume found a run that had already finished (nothing was trained)
    problems: list[str] = field(default_factory=list)  # ... and what fails its manifest


def train_one(config: QloraxConfig, output_dir: Path, threads: int | None, *, resume: bool = False,
              force: bool = False, options: runops.RunOptions | None = None, workers: int = 1,
              executor: str = "local", address: str | None = None, shared_dir: Path | None = None,
              storage: str | None = None, recovery: RecoveryPolicy | None = None) -> TrainOutcome:
    """One run: check inputs (and the durable store), consult the cache, admit, train in pinned
    children (one, or `workers` data-parallel ones of `threads` threads each, 1 by default; on
    this machine or placed by Ray), restarting after a loss as `recovery` allows, record."""
    options = options or runops.RunOptions(use_cache=False)
    recovery = recovery or RecoveryPolicy()
    runner = get_executor(executor, address=address, shared_dir=shared_dir)
    store = durable.open_store(storage) if storage else None
    keeps_checkpoints = runner.supports_resume or store is not None
    if (resume or recovery.max_restarts) and not keeps_checkpoints:
        raise ConfigError(f"--executor {executor}: a run it places keeps no checkpoints of its own (they are removed "
                          "with rank 0's working directory), so it cannot be resumed or restarted; pass --storage URI "
                          "(rank 0 then persists every checkpoint there), or train locally")
    launch = prepare_launch(config, options, workers)
    config = launch.config
    recovery.check(workers, config.training.save_steps, config.training.max_steps or 0)
    if resume and store is not None and durable.finished_on_storage(store):
        return _finished_on_storage(store, output_dir)
    key = runops.cache_key(config, launch.inputs) if options.use_cache and not resume else None
    cached = runops.cached_run(key) if key is not None else None
    if cached is None:
        runops.admit_run(options)  # before anything is written: a refused run leaves nothing behind
    prepare_output_dir(output_dir, resume=resume, force=force)
    audit = runops.audit_logger(options, output_dir.resolve().parent)
    audit.log_training_start(runops.redacted_config(config), launch.inputs.config_hash, output_dir)
    cache_hit = cached is not None and key is not None and runops.restore_from_cache(key, output_dir, cached)
    code = 0
    if not cache_hit:
        request = TrainRequest(config, launch.inputs, output_dir, threads or runner.default_threads(workers), workers,
                               resume, launch.secrets, storage=store.spec if store else None)
        code = _train(runner, request, store, recovery, audit, keeps_checkpoints)
        if code == 0 and key is not None:
            runops.store_in_cache(key, output_dir)
    if code == 0 and store is not None:
        durable.finish_durably(store, output_dir)
    runops.log_run_outcome(audit, output_dir, code, cache_hit)
    runops.record_metrics(options, [output_dir], [code])
    runops.record_tracking(options, [output_dir], [code])
    return TrainOutcome(code, output_dir, cache_hit, key)


def _train(runner: Any, request: TrainRequest, store: Any, recovery: RecoveryPolicy, audit: Any,
           keeps_checkpoints: bool) -> int:
    """Record the run's config where it can be resumed from (the run directory, durable
    storage), then train with automatic restarts; returns the exit code."""
    output_dir, config = request.output_dir, request.config
    if keeps_checkpoints:
        # Before the child starts: the config beside the (future) checkpoints, so that a run
        # killed before its first checkpoint can still be resumed by its directory alone.
        try:
            record_or_check_config(output_dir, config, request.inputs.config_hash, request.resume)
        except OSError as exc:
            raise OutputError(f"cannot record the run's config in {output_dir}: {exc.strerror or exc}; free space "
                              "or choose another --output-dir (nothing was trained)") from None
    if store is not None:
        durable.start_durably(store, output_dir, config, request.inputs, request.resume)
    if runner.name != "local" or request.workers > 1:  # built once here: several workers would race to build it
        prepare_base_model(config, dict(request.extra_env))
    code = train_with_recovery(runner, request, recovery, audit)
    if code != 0 and runner.name != "local":  # say so in the directory, as a local run does
        mark_failed(output_dir, f"the {runner.name}-placed run failed (exit {code}); see the lines printed above")
    if code == 0 and not (output_dir / MANIFEST).is_file():  # deleted between the child's exit and now
        raise RunDirectoryLost(output_dir)
    return code


def _finished_on_storage(store: Any, output_dir: Path) -> TrainOutcome:
    """`--resume` of a run that already finished on storage: nothing to train; the stored run is
    brought into output_dir when it is not there yet, and checked against its manifest."""
    if not (output_dir / MANIFEST).exists():
        prepare_output_dir(output_dir, resume=True, force=False)
        durable.fetch_finished_run(store, output_dir)
    problems = integrity_problems(verify_run_dir(output_dir))
    return TrainOutcome(EXIT_CHECK_FAILED if problems else 0, output_dir, finished=True, problems=problems)


def recorded_config(run_dir: Path) -> QloraxConfig:
    """The config an interrupted run recorded beside its checkpoints (what resume continues; a
    run stopped before its first checkpoint recorded it too, and resumes from step 0)."""
    config_path = Path(run_dir) / CHECKPOINTS_DIR / CHECKPOINT_CONFIG
    if not list_checkpoints(run_dir) and not config_path.is_file():
        status = (runops.read_status(run_dir) or "no training_metadata.json")
        raise OutputError(f"{run_dir} never started training: it holds no checkpoint and no finished run (status: "
                          f"{status}), so there is nothing to resume. Start it with `qlorax train --output-dir "
                          f"{run_dir}`.")
    if not config_path.is_file():
        raise OutputError(f"{run_dir} does not record its config ({config_path} is missing)")
    return parse_config(read_json(config_path)["config"], str(config_path))


def resume_run(target: Path | str, threads: int | None, options: runops.RunOptions | None = None,
               workers: int = 1, *, storage: str | None = None, output_dir: Path | None = None,
               recovery: RecoveryPolicy | None = None) -> TrainOutcome:
    """Continue an interrupted run from its newest valid checkpoint, with its recorded config
    (and the same audit, metrics and admission options as `train`).

    `target` is a run directory, or a stored run (s3://...) continued in `output_dir` (default
    ./<its last path part>) on any machine; `storage` names the durable copy of a run directory.
    Restarts (a pod, auto_recovery.sh) call resume again after a run finished: a finished run
    whose files match its manifest is exit 0 with nothing to do, one that fails its manifest
    exit 1 naming what differs; a directory that never reached a checkpoint is exit 2 saying so.
    Any number of workers may continue a checkpoint made with another: the state is the same."""
    if durable.is_storage_uri(target):
        storage, run_dir = str(target), Path(output_dir) if output_dir else durable.default_workdir(str(target))
    else:
        run_dir = Path(target)
    if not run_dir.is_dir() and storage is None:
        raise OutputError(f"{run_dir}: no such run directory to resume")
    holder = lock_holder(run_dir) if run_dir.is_dir() else None
    if holder is not None:
        raise OutputError(f"{run_dir} is in use by a running qlorax process (pid {holder}); it is not interrupted")
    if (run_dir / MANIFEST).exists():
        problems = integrity_problems(verify_run_dir(run_dir))
        if storage is not None and not problems:
            store = durable.open_store(storage)
            if not durable.finished_on_storage(store):  # finished here, the copy was cut short: finish it
                durable.finish_durably(store, run_dir)
        return TrainOutcome(EXIT_CHECK_FAILED if problems else 0, run_dir, finished=True, problems=problems)
    config = _config_to_resume(run_dir, storage)
    return train_one(config, run_dir, threads, resume=True, options=options, workers=workers, storage=storage,
                     recovery=recovery)


def _config_to_resume(run_dir: Path, storage: str | None) -> QloraxConfig:
    """The run directory's recorded config, else (a new machine) the stored run's."""
    if storage is None or (Path(run_dir) / CHECKPOINTS_DIR / CHECKPOINT_CONFIG).is_file():
        return recorded_config(run_dir)
    store = durable.open_store(storage)
    if not durable.holds_config(store):
        raise OutputError(f"{storage} holds no run to resume (no {CHECKPOINTS_DIR}/{CHECKPOINT_CONFIG} there); "
                          "start it with `qlorax train --storage ...`")
    return parse_config(durable.stored_run_config(store)["config"], f"{storage}/{CHECKPOINTS_DIR}/{CHECKPOINT_CONFIG}")


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


def prepare_base_model(config: QloraxConfig, extra_env: dict[str, str] | None = None) -> None:
    """Build a preset or GGUF base model once, in a pinned child, before parallel runs start."""
    if not materialisation_pending(config.model):
        return
    code = launch_job("prepare", {"config": config.canonical()}, config.determinism.profile, default_threads(),
                      extra_env=extra_env)
    if code != 0:
        raise QloraxError(f"could not build the base model {config.model.name_or_path} (exit {code})", exit_code=code)


def environment_report(profile: str | None, threads: int | None) -> dict[str, Any]:
    """The fingerprint and validation a training process would see, from a pinned `env` child."""
    chosen = get_profile(profile_name_from_env(profile))
    done = run_job_captured("env", {}, chosen.name, threads or default_threads())
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise QloraxError(f"the environment probe failed: {lines[-1] if lines else 'no message'}",
                          exit_code=EXIT_CHECK_FAILED)
    return json.loads(done.stdout)
