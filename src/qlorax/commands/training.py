"""CLI commands that run training in pinned child processes: train, resume, verify, env.

Each command parses its options, calls one use case in `qlorax.usecases`, renders the result
and ends with `raise typer.Exit(code)` (user errors are QloraxError, printed by cli.main).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from qlorax.phases import announce

console = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config (default: the built-in defaults).")
SetOption = typer.Option(None, "--set", help="Override one key, e.g. --set training.max_steps=10 (repeatable).")
SeedOption = typer.Option(None, "--seed", min=0, help="Override training.seed.")
WorkersOption = typer.Option(1, "--workers", min=1, help="Data-parallel worker processes (on this machine, or "
                             "placed by Ray with --executor ray; torch.distributed, gloo); the bits are those of one "
                             "worker. At most training.gradient_accumulation_steps.")
StorageOption = typer.Option(None, "--storage", help="Durable run storage: s3://BUCKET/PREFIX (credentials from "
                             "the standard AWS variables or ~/.aws/credentials; AWS_ENDPOINT_URL for an S3-compatible "
                             "store) or a directory on a shared volume. The config goes there first, every checkpoint "
                             "as it is written, the finished run last.")
MaxRestartsOption = typer.Option(0, "--max-restarts", min=0, help="Restart by itself from the newest checkpoint "
                                 "after a lost worker or node, at most this many times (same bits).")
MinWorkersOption = typer.Option(None, "--min-workers", min=1, help="With --max-restarts: the fewest workers a "
                                "restart may continue on when nodes are lost (default 1).")
ProfileOption = typer.Option(None, "--profile", help="Override determinism.profile (strict | portable | off; "
                             "default: $QLORAX_PROFILE, else the config's).")
# The operational options of every command that runs training (none of them changes the
# bits), declared once: `with_run_options` adds them to a command's signature and hands the
# command one RunOptions. (RunOptions field, type, option)
_RUN_OPTIONS = (
    ("token_file", Path | None, typer.Option(None, "--token-file",
                                             help="File holding a Hugging Face token (never an env var).")),
    ("audit_log", Path | None, typer.Option(None, "--audit-log",
                                            help="Audit log (default: audit.jsonl beside the output dir).")),
    ("pushgateway", str | None, typer.Option(None, "--pushgateway", help="Push run metrics to this Pushgateway URL.")),
    ("mlflow_uri", str | None, typer.Option(None, "--mlflow-uri",
                                            help="Log params, metrics, digests and artifacts to this MLflow "
                                                 "tracking server (extra qlorax[mlflow]).")),
    ("metrics_textfile", Path | None, typer.Option(None, "--metrics-textfile",
                                                   help="Write metrics in node-exporter textfile format.")),
    ("environment", str | None, typer.Option(None, "--environment",
                                             help="Metrics/audit environment label (default: detected).")),
    ("min_memory_gb", float, typer.Option(1.0, "--min-memory-gb", min=0,
                                          help="Admission: free memory needed to start.")),
    ("max_cpu_percent", float, typer.Option(100.0, "--max-cpu-percent", min=1, max=100,
                                            help="Admission: CPU use allowed to start.")),
    ("resource_timeout_minutes", float, typer.Option(30.0, "--resource-timeout", min=0,
                                                     help="Admission: minutes to wait.")),
)
RUN_OPTIONS: Any = None  # placeholder default of the `options` parameter that with_run_options replaces


def with_run_options(command: Callable[..., None]) -> Callable[..., None]:
    """Replace the command's `options` parameter by the operational CLI options, collected
    into one RunOptions (so train and verify declare and build them in one place)."""
    from qlorax.usecases.runops import RunOptions

    signature = inspect.signature(command)
    kept = [p for name, p in signature.parameters.items() if name != "options"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=option)
             for name, kind, option in _RUN_OPTIONS]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        values = {name: kwargs.pop(name) for name, _, _ in _RUN_OPTIONS}
        command(**kwargs, options=RunOptions(use_cache=False, **values))

    wrapper.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
    return wrapper


def _print_run_summary(output_dir: Path) -> None:
    from qlorax.usecases.training import run_summary

    table = Table(title=f"run {output_dir}", show_header=False)
    for label, value in run_summary(output_dir):
        table.add_row(label, value)
    console.print(table)


@with_run_options
def train(
    config: Path | None = ConfigOption,
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Run directory to create."),
    threads: int | None = typer.Option(None, "--threads", min=1,
                                       help="Threads (default: all cores; 1 per worker with --workers)."),
    workers: int = WorkersOption,
    seed: int | None = SeedOption,
    profile: str | None = ProfileOption,
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest valid checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace a finished run in --output-dir."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Train even if the cache holds this run."),
    executor: str = typer.Option("local", "--executor", help="local (worker processes here) or ray (workers "
                                 "placed on a Ray cluster)."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: start one)."),
    shared_dir: Path | None = typer.Option(None, "--shared-dir", help="Ray: a directory every node can write."),
    storage: str | None = StorageOption,
    max_restarts: int = MaxRestartsOption,
    min_workers: int | None = MinWorkersOption,
    set_: list[str] | None = SetOption,
    options: Any = RUN_OPTIONS,
) -> None:
    """Train one LoRA adapter, bit-reproducibly, in a fresh pinned process (or data-parallel workers)."""
    from qlorax.usecases import runops
    from qlorax.usecases import training as runs
    from qlorax.usecases.recovery import RecoveryPolicy

    announce("inputs: checking the config, the data and the base model")
    options.use_cache = runops.cache_enabled(not no_cache)
    cfg = runs.resolve_config(config, set_, seed, profile)
    outcome = runs.train_one(cfg, output_dir, threads, resume=resume, force=force, options=options,
                             workers=workers, executor=executor, address=address, shared_dir=shared_dir,
                             storage=storage, recovery=RecoveryPolicy(max_restarts, min_workers))
    if outcome.finished:
        _print_finished(output_dir, outcome.problems)
        raise typer.Exit(outcome.exit_code)
    if outcome.cache_hit:
        console.print(f"cache hit: restored the verified run {outcome.cache_key[:12]} into {output_dir} "
                      "(use --no-cache to retrain)")
    if outcome.exit_code == 0:
        _print_run_summary(output_dir)
    raise typer.Exit(outcome.exit_code)


def _print_finished(run_dir: Path, problems: list[str]) -> None:
    if not problems:
        console.print(f"nothing to do: {run_dir} is a finished run and matches its manifest", soft_wrap=True)
    else:
        console.print(f"{run_dir} is a finished run but fails its manifest: {'; '.join(problems)}",
                      soft_wrap=True, markup=False)


@with_run_options
def resume(
    target: str = typer.Argument(..., metavar="RUN_DIR_OR_URI", help="The interrupted run directory, or a stored "
                                 "run (s3://BUCKET/PREFIX) to continue on this machine."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="For a stored run: the working "
                                           "directory here (default: ./<last part of the URI>)."),
    threads: int | None = typer.Option(None, "--threads", min=1),
    workers: int = typer.Option(1, "--workers", min=1, help="Data-parallel worker processes on this machine; "
                                "any number continues any checkpoint (the state is the same)."),
    storage: str | None = StorageOption,
    max_restarts: int = MaxRestartsOption,
    min_workers: int | None = MinWorkersOption,
    options: Any = RUN_OPTIONS,
) -> None:
    """Continue an interrupted run from its newest valid checkpoint (with any number of workers)."""
    from qlorax.usecases.recovery import RecoveryPolicy
    from qlorax.usecases.training import resume_run

    announce(f"inputs: checking {target} and its recorded config")
    outcome = resume_run(target, threads, options, workers=workers, storage=storage, output_dir=output_dir,
                         recovery=RecoveryPolicy(max_restarts, min_workers))
    if outcome.finished:
        _print_finished(outcome.output_dir, outcome.problems)
    elif outcome.exit_code == 0:
        _print_run_summary(outcome.output_dir)
    raise typer.Exit(outcome.exit_code)


@with_run_options
def verify(
    config: Path | None = ConfigOption,
    runs: int = typer.Option(3, "--runs", "-n", min=2, help="Number of independent runs."),
    output_dir: Path = typer.Option(Path("runs/verify"), "--output-dir", "-o",
                                    help="Where run-XX/ and the report go."),
    threads: str = typer.Option("1,2", "--threads", help="Thread counts (per worker), alternated across runs."),
    workers: str = typer.Option("1", "--workers", help="Data-parallel workers per run, alternated across runs "
                                "like --threads (e.g. 1,2 proves the bits do not depend on the world size)."),
    cpu: str = typer.Option("native", "--cpu", help="Processors, alternated across runs like --threads: "
                            "native and/or QEMU CPU models (e.g. native,Haswell-v4). Emulated runs cost ~100x "
                            "per step (a default-config step took ~12 minutes): tiny configs only."),
    jobs: int | None = typer.Option(None, "--jobs", "-j", min=1,
                                    help="Runs at once (default: what the cores allow)."),
    executor: str = typer.Option("local", "--executor", help="local (process per run) or ray."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: start one)."),
    shared_dir: Path | None = typer.Option(None, "--shared-dir", help="Ray: a directory every node can write."),
    storage: str | None = typer.Option(None, "--storage", help="Durable storage for every run (URI/run-XX): "
                                       "s3://BUCKET/PREFIX or a shared directory; a Ray task retried after a lost "
                                       "node continues its run from the newest stored checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace earlier runs in --output-dir."),
    seed: int | None = SeedOption,
    profile: str | None = ProfileOption,
    set_: list[str] | None = SetOption,
    options: Any = RUN_OPTIONS,
) -> None:
    """Run the same training N times in fresh processes and prove the results are bit-identical."""
    from qlorax.executors.emulation import parse_cpus
    from qlorax.layout import verification_run_name
    from qlorax.usecases.training import resolve_config
    from qlorax.usecases.verification import verify_many
    from qlorax.verify import parse_threads

    announce("inputs: checking the config, the data and the base model")
    cfg = resolve_config(config, set_, seed, profile)
    outcome = verify_many(cfg, output_dir, runs, parse_threads(threads), jobs=jobs, executor=executor,
                                    address=address, shared_dir=shared_dir, force=force, options=options,
                                    cpus=parse_cpus(cpu), worker_counts=parse_threads(workers, "--workers"),
                                    storage=storage)
    for index in outcome.failed_runs:
        name = verification_run_name(index)
        console.print(f"{name} exited with code {outcome.exit_codes[index]} "
                      f"(log: {outcome.log_dir / name}.log)")
    summary = outcome.summary
    table = Table(title="qlorax verify", show_header=False)
    table.add_row("runs", str(summary["runs"]))
    table.add_row("threads", threads)
    table.add_row("workers", workers)
    table.add_row("processors", cpu)
    table.add_row("reproducibility score", f"{summary['score']:.3f}")
    table.add_row("adapter sha256", str(summary["adapter_sha256"]))
    table.add_row("report", summary["report"])
    table.add_row("plot", summary["plot"])
    table.add_row("page", summary["page"])
    Console().print(table)
    for line in outcome.report.get("conclusions", []):
        print(f"- {line}")
    raise typer.Exit(outcome.exit_code)


def env(
    profile: str | None = typer.Option(None, "--profile", help="strict | portable | off (default: "
                                       "$QLORAX_PROFILE or strict)"),
    threads: int | None = typer.Option(None, "--threads", help="Thread count to pin (default: all cores)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print the environment fingerprint and validate the determinism setup (in a pinned child)."""
    from qlorax.usecases.training import environment_report

    record = environment_report(profile, threads)
    if as_json:
        print(json.dumps(record, indent=2, sort_keys=True))
    else:
        table = Table(title="qlorax environment", show_header=False)
        for key, value in sorted(record["fingerprint"].items()):
            table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
        table.add_row("fingerprint_sha256", record["fingerprint_sha256"])
        Console().print(table)
        for message in record["validation"]["messages"]:
            print(f"validation: {message}")
        print(f"valid: {record['validation']['valid']}")
    raise typer.Exit(0 if record["validation"]["valid"] else 1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command()(train)
    app.command()(resume)
    app.command()(verify)
    app.command()(env)
