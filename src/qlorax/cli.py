"""The `qlorax` command line: parse, call one function, render, return an exit code.

No module imported here at load time may import torch: commands that do not train
(analyze, gates, check, audit, serve, config) must start fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Table
from typer import TyperException

from qlorax import __version__
from qlorax.commands import analysis as analysis_commands
from qlorax.commands import deploy as deploy_commands
from qlorax.commands import ops as ops_commands
from qlorax.errors import QloraxError

app = typer.Typer(
    name="qlorax",
    help="Reproducibility-first LoRA fine-tuning: bit-identical runs, proven.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Reproducibility-first LoRA fine-tuning: bit-identical runs, proven."""


for _module in (analysis_commands, ops_commands, deploy_commands):
    _module.register(app)


@app.command()
def version() -> None:
    """Print the qlorax version."""
    print(__version__)


config_app = typer.Typer(help="Show the resolved config or its JSON Schema.", no_args_is_help=True)
app.add_typer(config_app, name="config")
model_app = typer.Typer(help="Base models.", no_args_is_help=True)
app.add_typer(model_app, name="model")

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config (default: the built-in defaults).")
SetOption = typer.Option(None, "--set", help="Override one key, e.g. --set training.max_steps=10 (repeatable).")


def parse_overrides(pairs: list[str] | None) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings into nested overrides (values parsed as YAML scalars)."""
    from qlorax.errors import ConfigError

    overrides: dict[str, dict[str, Any]] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"--set {pair!r}: expected section.key=value, e.g. training.max_steps=10")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        overrides.setdefault(section, {})[name] = value
    return overrides


def resolve_config(config: Path | None, pairs: list[str] | None, seed: int | None = None,
                   profile: str | None = None) -> Any:
    from qlorax.config import load_config

    overrides = parse_overrides(pairs)
    if seed is not None:
        overrides.setdefault("training", {})["seed"] = seed
    profile = profile or os.environ.get("QLORAX_PROFILE") or None
    if profile is not None:
        overrides.setdefault("determinism", {})["profile"] = profile
    return load_config(config, overrides)


@config_app.command("show")
def config_show(config: Path | None = typer.Argument(None, help="YAML config to resolve."),
                as_json: bool = typer.Option(False, "--json", help="Canonical JSON instead of YAML."),
                set_: list[str] | None = SetOption) -> None:
    """Print the resolved config (defaults filled in) and its hash."""
    from qlorax.config import config_to_yaml

    cfg = resolve_config(config, set_)
    if as_json:
        print(json.dumps({"config": cfg.canonical(), "config_hash": cfg.config_hash()}, indent=2, sort_keys=True))
        return
    print(f"# config_hash: {cfg.config_hash()}")
    print(config_to_yaml(cfg), end="")


@config_app.command("schema")
def config_schema() -> None:
    """Print the config's JSON Schema."""
    from qlorax.config import config_json_schema

    print(json.dumps(config_json_schema(), indent=2, sort_keys=True))


@model_app.command("path")
def model_path(name: str = typer.Argument("qlorax/tiny-llama", help="Preset name, local dir or hub id.")) -> None:
    """Print the local directory of a base model (materialising the preset if needed)."""
    from qlorax.config import ModelSection
    from qlorax.model import resolve_base_model

    info = resolve_base_model(ModelSection(name_or_path=name))
    print(info.local_dir)


@app.command()
def env(
    profile: str | None = typer.Option(None, "--profile", help="strict | portable | off (default: "
                                       "$QLORAX_PROFILE or strict)"),
    threads: int | None = typer.Option(None, "--threads", help="Thread count to pin (default: all cores)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print the environment fingerprint and validate the determinism setup (in a pinned child)."""
    import subprocess

    from qlorax.determinism import PROFILES, child_environment
    from qlorax.errors import ConfigError
    from qlorax.launcher import default_threads

    profile = profile or os.environ.get("QLORAX_PROFILE") or "strict"
    if profile not in PROFILES:
        raise ConfigError(f"--profile {profile!r}: expected one of {', '.join(PROFILES)}")
    child_env, removed = child_environment(os.environ, profile, threads or default_threads())
    code = ("import json; from qlorax.envreport import report; print(json.dumps(report()))")
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        console.print(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "environment probe failed")
        raise typer.Exit(1)
    record = json.loads(out.stdout)
    record["removed_numeric_variables"] = removed
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


def _check_model_reference(cfg: Any) -> None:
    """Fail fast (before launching) on a local model path that does not exist."""
    from qlorax.model import local_model_dir

    local_model_dir(cfg.model)


def run_one_training(cfg: Any, output_dir: Path, threads: int | None, *, resume: bool, force: bool,
                     extra_env: dict[str, str] | None = None) -> int:
    """Validate inputs in this process (no torch), then train in a pinned child process."""
    from qlorax.data import read_data_file
    from qlorax.launcher import default_threads, launch_training
    from qlorax.rundir import prepare_output_dir

    read_data_file(cfg.data)
    _check_model_reference(cfg)
    prepare_output_dir(output_dir, resume=resume, force=force)
    return launch_training(cfg, output_dir, threads or default_threads(), resume=resume, extra_env=extra_env)


def _print_run_summary(output_dir: Path) -> None:
    from qlorax.artifacts import load_manifest, read_json

    results = read_json(output_dir / "results.json")
    manifest = load_manifest(output_dir) or {}
    metadata = read_json(output_dir / "training_metadata.json")
    table = Table(title=f"run {output_dir}", show_header=False)
    first, last = results["initial_train_loss"], results["train_loss"]
    table.add_row("train loss (first → last window)", f"{first:.4f} → {last:.4f}")
    table.add_row("eval loss / perplexity", f"{results['eval_loss']:.4f} / {results['eval_perplexity']:.2f}")
    table.add_row("steps / tokens", f"{results['steps']} / {results['train_tokens']}")
    table.add_row("tokens/s", str(metadata.get("tokens_per_second")))
    table.add_row("adapter sha256", manifest.get("files", {}).get("adapter_model.safetensors", {}).get("sha256", "?"))
    table.add_row("deterministic digest", manifest.get("deterministic_digest", "?"))
    Console(stderr=True).print(table)


TokenFileOption = typer.Option(None, "--token-file", help="File holding a Hugging Face token (never an env var).")
AuditLogOption = typer.Option(None, "--audit-log", help="Audit log (default: audit.jsonl beside the output dir).")
PushgatewayOption = typer.Option(None, "--pushgateway", help="Push run metrics to this Pushgateway URL.")
TextfileOption = typer.Option(None, "--metrics-textfile", help="Write metrics in node-exporter textfile format.")
EnvironmentOption = typer.Option(None, "--environment", help="Metrics/audit environment label (default: detected).")
MinMemoryOption = typer.Option(1.0, "--min-memory-gb", min=0, help="Admission: free memory needed to start.")
MaxCpuOption = typer.Option(100.0, "--max-cpu-percent", min=1, max=100, help="Admission: CPU use allowed to start.")
ResourceTimeoutOption = typer.Option(30.0, "--resource-timeout", min=0, help="Admission: minutes to wait.")


@app.command()
def train(
    config: Path | None = ConfigOption,
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Run directory to create."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Threads (default: all cores)."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Override training.seed."),
    profile: str | None = typer.Option(None, "--profile", help="Override determinism.profile."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest valid checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace a finished run in --output-dir."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Train even if the cache holds this run."),
    set_: list[str] | None = SetOption,
    token_file: Path | None = TokenFileOption,
    audit_log: Path | None = AuditLogOption,
    pushgateway: str | None = PushgatewayOption,
    metrics_textfile: Path | None = TextfileOption,
    environment: str | None = EnvironmentOption,
    min_memory_gb: float = MinMemoryOption,
    max_cpu_percent: float = MaxCpuOption,
    resource_timeout: float = ResourceTimeoutOption,
) -> None:
    """Train one LoRA adapter, bit-reproducibly, in a fresh pinned process."""
    from qlorax import runops
    from qlorax.data import read_data_file
    from qlorax.launcher import default_threads, launch_training
    from qlorax.rundir import prepare_output_dir

    options = runops.RunOptions(token_file=token_file, audit_log=audit_log, pushgateway=pushgateway,
                                metrics_textfile=metrics_textfile, use_cache=runops.cache_enabled(not no_cache),
                                environment=environment, min_memory_gb=min_memory_gb,
                                max_cpu_percent=max_cpu_percent, resource_timeout_minutes=resource_timeout)
    cfg = resolve_config(config, set_, seed, profile)
    data = read_data_file(cfg.data)
    _check_model_reference(cfg)
    secrets = runops.secret_environment(options)
    key = runops.cache_key(cfg, data.sha256) if options.use_cache and not resume else None
    cached = key is not None and runops.cached_run_available(key)
    if not cached:
        runops.admit_run(options)  # before anything is written: a refused run leaves nothing behind
    prepare_output_dir(output_dir, resume=resume, force=force)
    audit = runops.audit_logger(options, output_dir.resolve().parent)
    audit.log_training_start(runops.redacted_config(cfg), cfg.config_hash(), output_dir)
    cache_hit = cached and runops.restore_from_cache(key, output_dir)
    if cache_hit:
        console.print(f"cache hit: restored the verified run {key[:12]} into {output_dir} (use --no-cache to retrain)")
        code = 0
    else:
        code = launch_training(cfg, output_dir, threads or default_threads(), resume=resume, extra_env=secrets)
        if code == 0 and key is not None:
            runops.store_in_cache(key, output_dir)
    runops.log_run_outcome(audit, output_dir, code, cache_hit)
    runops.record_metrics(options, [output_dir], [code])
    if code == 0:
        _print_run_summary(output_dir)
    raise typer.Exit(code)


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="The interrupted run directory."),
    threads: int | None = typer.Option(None, "--threads", min=1),
) -> None:
    """Continue an interrupted run from its newest valid checkpoint."""
    from qlorax.artifacts import read_json
    from qlorax.checkpoint import list_checkpoints
    from qlorax.config import parse_config
    from qlorax.errors import OutputError

    if not list_checkpoints(run_dir):
        raise OutputError(f"{run_dir} has no checkpoints to resume from")
    config_path = run_dir / "checkpoints" / "config.json"
    if not config_path.is_file():
        raise OutputError(f"{run_dir} does not record its config ({config_path} is missing)")
    cfg = parse_config(read_json(config_path)["config"], str(config_path))
    code = run_one_training(cfg, run_dir, threads, resume=True, force=False)
    if code == 0:
        _print_run_summary(run_dir)
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point: user errors become one paragraph and an exit code."""
    try:
        returned = app(standalone_mode=False)  # typer returns (not raises) typer.Exit codes here
    except QloraxError as exc:
        from qlorax.ops.secrets import scrub_text

        console.print(f"[bold red]error:[/] {scrub_text(exc.message)}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[bold red]aborted[/]")
        sys.exit(130)
    except TyperException as exc:  # usage errors: unknown option, missing argument
        if hasattr(exc, "show"):
            exc.show()
        else:
            console.print(f"[bold red]error:[/] {exc}")
        sys.exit(getattr(exc, "exit_code", 2) or 2)
    sys.exit(returned if isinstance(returned, int) else 0)



def _parse_perturbations(values: list[str] | None) -> dict[int, dict[str, dict[str, Any]]]:
    """Test-only `INDEX:section.key=value` overrides for single verification runs."""
    from qlorax.errors import ConfigError

    result: dict[int, dict[str, dict[str, Any]]] = {}
    for value in values or []:
        index, sep, pair = value.partition(":")
        if not sep or not index.isdigit():
            raise ConfigError(f"--perturb {value!r}: expected INDEX:section.key=value")
        for section, items in parse_overrides([pair]).items():
            result.setdefault(int(index), {}).setdefault(section, {}).update(items)
    return result


@app.command()
def verify(
    config: Path | None = ConfigOption,
    runs: int = typer.Option(3, "--runs", "-n", min=2, help="Number of independent runs."),
    output_dir: Path = typer.Option(Path("runs/verify"), "--output-dir", "-o", help="Where run-XX/ and the report go."),
    threads: str = typer.Option("1,2", "--threads", help="Thread counts, alternated across runs."),
    jobs: int | None = typer.Option(None, "--jobs", "-j", min=1, help="Runs at once (default: what the cores allow)."),
    executor: str = typer.Option("local", "--executor", help="local (process per run) or ray."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: start a local one)."),
    shared_dir: Path | None = typer.Option(None, "--shared-dir", help="Ray: a directory every node can write."),
    force: bool = typer.Option(False, "--force", help="Replace earlier runs in --output-dir."),
    seed: int | None = typer.Option(None, "--seed", min=0),
    profile: str | None = typer.Option(None, "--profile"),
    set_: list[str] | None = SetOption,
    perturb: list[str] | None = typer.Option(None, "--perturb", hidden=True,
                                             help="Test only: INDEX:section.key=value for one run."),
    token_file: Path | None = TokenFileOption,
    audit_log: Path | None = AuditLogOption,
    pushgateway: str | None = PushgatewayOption,
    metrics_textfile: Path | None = TextfileOption,
    environment: str | None = EnvironmentOption,
    min_memory_gb: float = MinMemoryOption,
    max_cpu_percent: float = MaxCpuOption,
    resource_timeout: float = ResourceTimeoutOption,
) -> None:
    """Run the same training N times in fresh processes and prove the results are bit-identical."""
    from qlorax import runops
    from qlorax.commands.analysis import run_analyze
    from qlorax.data import read_data_file
    from qlorax.errors import ConfigError
    from qlorax.verify import default_jobs, parse_threads, plan_runs, run_local, summarise

    options = runops.RunOptions(token_file=token_file, audit_log=audit_log, pushgateway=pushgateway,
                                metrics_textfile=metrics_textfile, use_cache=False, environment=environment,
                                min_memory_gb=min_memory_gb, max_cpu_percent=max_cpu_percent,
                                resource_timeout_minutes=resource_timeout)
    cfg = resolve_config(config, set_, seed, profile)
    read_data_file(cfg.data)
    _check_model_reference(cfg)
    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor {executor!r}: expected local or ray")
    thread_counts = parse_threads(threads)
    specs = plan_runs(cfg, output_dir, runs, thread_counts, _parse_perturbations(perturb))
    secrets = runops.secret_environment(options)
    runops.admit_run(options)
    if executor == "local":
        codes = run_local(specs, jobs or default_jobs(thread_counts), output_dir / "logs", force, extra_env=secrets)
    else:
        from qlorax.executors import run_ray

        codes = run_ray(specs, jobs, output_dir / "logs", force, address=address, shared_dir=shared_dir)
    for index, code in sorted(codes.items()):
        if code != 0:
            console.print(f"run-{index:02d} exited with code {code} (log: {output_dir / 'logs'}/run-{index:02d}.log)")
    report, files = run_analyze([spec.run_dir for spec in specs], output_dir)
    summary = summarise(report, files)
    audit = runops.audit_logger(options, output_dir)
    audit.log_verification({**summary, "config_hash": cfg.config_hash(),
                            "conclusions": report.get("conclusions", [])})
    runops.record_metrics(options, [s.run_dir for s in specs], [codes[s.index] for s in specs], summary["score"])
    table = Table(title="qlorax verify", show_header=False)
    table.add_row("runs", str(summary["runs"]))
    table.add_row("threads", threads)
    table.add_row("reproducibility score", f"{summary['score']:.3f}")
    table.add_row("adapter sha256", str(summary["adapter_sha256"]))
    table.add_row("report", summary["report"])
    table.add_row("plot", summary["plot"])
    Console().print(table)
    for line in report.get("conclusions", []):
        print(f"- {line}")
    raise typer.Exit(0 if summary["score"] == 1.0 else 1)


if __name__ == "__main__":
    main()
