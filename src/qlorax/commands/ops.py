"""Production-operations commands: serve, audit, cache, metrics, resources.

Registered by qlorax.cli. Nothing heavy (flask, waitress, psutil) is imported at module
level, and no command imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from qlorax.commands.units import format_size, parse_duration
from qlorax.errors import EXIT_CHECK_FAILED, QloraxError

audit_app = typer.Typer(help="Tamper-evident audit log (hash-chained JSON Lines).", no_args_is_help=True)
cache_app = typer.Typer(help="The content-addressed cache of finished runs.", no_args_is_help=True)
metrics_app = typer.Typer(
    help="Prometheus metrics for batch runs (Pushgateway, textfile).", no_args_is_help=True
)
resources_app = typer.Typer(help="Resource admission (free memory, CPU load).", no_args_is_help=True)

# -- serve ---------------------------------------------------------------------------------
def serve_command(
    host: str = typer.Option("127.0.0.1", help="Address to bind; the default keeps both servers local."),
    metrics_port: int = typer.Option(8000, help="Port of /metrics (0 = any free port)."),
    health_port: int = typer.Option(8080, help="Port of /health, /livez, /readyz (0 = any free port)."),
    artifact_dir: Path = typer.Option(Path("runs"), help="Directory that must be writable for /health."),
    watch_dir: Path | None = typer.Option(
        None, help="Record finished runs (subdirectories) and verification reports (*.json) found here."
    ),
    watch_interval: float = typer.Option(15.0, min=0.1, help="Seconds between scans of --watch-dir."),
    environment: str | None = typer.Option(
        None, help="environment label (default: $QLORAX_ENVIRONMENT, else detected)."
    ),
    min_free_memory_mb: float = typer.Option(256.0, help="/health fails below this much available memory."),
    min_free_disk_mb: float = typer.Option(1024.0, help="/health fails below this much free disk."),
    profile: str | None = typer.Option(None, help="Profile whose pins /health validates (default: $QLORAX_PROFILE "
                                       "or strict)."),
) -> None:
    """Serve /metrics (Prometheus) and /health, /livez, /readyz until SIGTERM or Ctrl-C."""
    from qlorax.ops.health import serve

    serve(
        host=host,
        metrics_port=metrics_port,
        health_port=health_port,
        artifact_dir=artifact_dir,
        watch_dir=watch_dir,
        watch_interval=watch_interval,
        environment=environment,
        min_free_memory_mb=min_free_memory_mb,
        min_free_disk_mb=min_free_disk_mb,
        profile=profile,
    )


# -- audit -----------------------------------------------------------------------------------
@audit_app.command("verify")
def audit_verify(
    log: Path = typer.Argument(..., help="The audit log (its .head anchor is read next to it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check the hash chain: exit 0 if intact, 1 naming each edited, deleted, inserted or reordered line."""
    from qlorax.ops.audit import head_path, verify_log

    if not log.is_file():
        raise QloraxError(f"audit log {log} not found")
    ok, problems = verify_log(log)
    head: dict[str, Any] = {}
    try:
        head = json.loads(head_path(log).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    events = sum(1 for line in log.read_bytes().split(b"\n") if line.strip())
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "log": str(log),
                    "ok": ok,
                    "events": events,
                    "problems": problems,
                    "head": {k: head.get(k) for k in ("seq", "event_hash")},
                },
                indent=2,
            )
        )
    elif ok:
        typer.echo(
            f"{log}: OK, {events} events, hash chain intact; head seq {head.get('seq')} "
            f"event_hash {head.get('event_hash')}"
        )
    else:
        typer.echo(f"{log}: TAMPERED or damaged ({len(problems)} problem(s)):", err=True)
        for problem in problems:
            typer.echo(f"  {problem}", err=True)
    if not ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


# -- cache -----------------------------------------------------------------------------------
_CACHE_DIR_HELP = "Cache directory (default: $QLORAX_CACHE_DIR or ~/.cache/qlorax/runs)."


@cache_app.command("ls")
def cache_ls(
    cache_dir: Path | None = typer.Option(None, help=_CACHE_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the entries as JSON."),
) -> None:
    """List cached runs, most recently used first."""
    from qlorax.ops.cache import CacheManager

    manager = CacheManager(cache_dir)
    entries = manager.entries()
    if as_json:
        typer.echo(json.dumps([{k: v for k, v in e.items() if k != "last_used"} for e in entries], indent=2))
        return
    if not entries:
        typer.echo(f"{manager.cache_dir}: no cached runs")
        return
    typer.echo(f"{manager.cache_dir}: {len(entries)} cached run(s)")
    typer.echo(f"{'key':14} {'last used':21} {'size':>10} {'files':>5}  {'profile':8} config_hash")
    for entry in entries:
        config = (entry.get("config_hash") or "?")[:12]
        typer.echo(
            f"{entry['key'][:12]:14} {entry['last_used_at']:21} {format_size(entry['size_bytes']):>10} "
            f"{entry['file_count'] if entry['file_count'] is not None else '?':>5}  "
            f"{entry.get('profile') or '?':8} {config}"
        )


@cache_app.command("gc")
def cache_gc(
    cache_dir: Path | None = typer.Option(None, help=_CACHE_DIR_HELP),
    max_entries: int | None = typer.Option(None, min=0, help="Keep at most this many (most recently used)."),
    older_than: str | None = typer.Option(None, help="Remove entries unused for longer than this (7d, 12h)."),
) -> None:
    """Remove old or surplus cache entries (and entries with broken metadata)."""
    from qlorax.ops.cache import CacheManager

    seconds = parse_duration(older_than, "--older-than") if older_than is not None else None
    manager = CacheManager(cache_dir)
    removed = manager.gc(max_entries=max_entries, older_than_seconds=seconds)
    for key in removed:
        typer.echo(f"removed {key}")
    typer.echo(
        f"{manager.cache_dir}: removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, "
        f"{len(manager.entries())} left"
    )


# -- metrics ---------------------------------------------------------------------------------
@metrics_app.command("record")
def metrics_record(
    run_dirs: list[Path] = typer.Argument(..., help="Finished (or failed) run directories."),
    pushgateway: str | None = typer.Option(None, help="Pushgateway URL, e.g. http://127.0.0.1:9091."),
    job: str = typer.Option("qlorax", help="Pushgateway job label."),
    textfile: Path | None = typer.Option(None, help="Also write a node-exporter textfile (*.prom)."),
    environment: str | None = typer.Option(None, help="environment label (default: from env.json)."),
    score: float | None = typer.Option(None, min=0.0, max=1.0, help="Reproducibility score to record."),
) -> None:
    """Record finished runs as metrics and push them / write them (for batch jobs and cron)."""
    from qlorax.fingerprint import detect_environment_kind
    from qlorax.ops.metrics import TrainingMetrics

    metrics = TrainingMetrics()
    for run_dir in run_dirs:
        if not metrics.record_run_dir(run_dir, environment):
            raise QloraxError(
                f"{run_dir} is not a finished run (no manifest, or training_metadata.json "
                "does not say failed)"
            )
    if score is not None:
        metrics.record_score(environment or detect_environment_kind(), score)
    if pushgateway:
        metrics.push(pushgateway, job=job)
        from qlorax.ops.secrets import scrub_text

        typer.echo(f"pushed {len(run_dirs)} run(s) to {scrub_text(pushgateway)} (job {job})")
    if textfile is not None:
        metrics.write_textfile(textfile)
        typer.echo(f"wrote {textfile}")
    if not pushgateway and textfile is None:
        typer.echo(metrics.exposition().decode("utf-8"), nl=False)


# -- resources -------------------------------------------------------------------------------
@resources_app.command("check")
def resources_check(
    min_memory_gb: float = typer.Option(8.0, min=0.0, help="GiB of available memory required."),
    max_cpu_percent: float = typer.Option(80.0, min=1.0, max=100.0, help="CPU use above which to wait."),
    wait_minutes: float = typer.Option(0.0, min=0.0, help="Wait up to this long for resources."),
    poll_seconds: float = typer.Option(10.0, min=0.01, help="Seconds between checks while waiting."),
    cpu_sample_seconds: float = typer.Option(1.0, min=0.0, help="Window over which CPU use is measured."),
    as_json: bool = typer.Option(False, "--json", help="Print the final status as JSON."),
) -> None:
    """Check (or wait for) the resources a training run needs; exit 3 if they do not become free."""
    from qlorax.ops.resources import ResourceManager, admit, describe

    manager = ResourceManager(
        min_memory_gb=min_memory_gb,
        max_cpu_percent=max_cpu_percent,
        poll_seconds=poll_seconds,
        cpu_sample_seconds=cpu_sample_seconds,
    )
    status = admit(manager, wait_minutes)
    typer.echo(json.dumps(status, indent=2) if as_json else f"ready for training: {describe(status)}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("serve")(serve_command)
    app.add_typer(audit_app, name="audit")
    app.add_typer(cache_app, name="cache")
    app.add_typer(metrics_app, name="metrics")
    app.add_typer(resources_app, name="resources")
