"""What happens around every run: admission, secrets, cache, audit trail and metrics.

The training itself knows nothing of these; `qlorax train` and `qlorax verify` wrap each
run with them here, in the parent process (no torch).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlorax import __version__, settings
from qlorax.artifacts import load_manifest, read_json
from qlorax.config import QloraxConfig
from qlorax.errors import ConfigError, QloraxError
from qlorax.inputs import ResolvedInputs
from qlorax.layout import AUDIT_LOG, RESULTS

if TYPE_CHECKING:
    from qlorax.ops.cache import CacheKey


@dataclass
class RunOptions:
    """The operational options shared by train and verify (none of them changes the bits)."""

    token_file: Path | None = None
    audit_log: Path | None = None
    pushgateway: str | None = None
    metrics_textfile: Path | None = None
    mlflow_uri: str | None = None
    use_cache: bool = True
    environment: str | None = None
    min_memory_gb: float = 1.0
    max_cpu_percent: float = 100.0
    resource_timeout_minutes: float = 30.0


def cache_enabled(requested: bool) -> bool:
    """--no-cache wins; QLORAX_CACHE=off disables the cache for a whole session (tests, CI)."""
    return requested and not settings.cache_switched_off()


def admit_run(options: RunOptions) -> None:
    """Wait (with a message) until memory and CPU allow a run; ResourceError (exit 3) on time-out."""
    from qlorax.ops.resources import ResourceManager, admit

    manager = ResourceManager(min_memory_gb=options.min_memory_gb, max_cpu_percent=options.max_cpu_percent,
                              poll_seconds=min(10.0, max(0.5, options.resource_timeout_minutes * 60 / 10)),
                              cpu_sample_seconds=0 if options.max_cpu_percent >= 100 else 1.0)
    admit(manager, options.resource_timeout_minutes)


def secret_environment(options: RunOptions) -> dict[str, str]:
    """The token from --token-file, handed to the training process as HF_TOKEN for hub access.

    Registered as a secret first, so it is scrubbed from anything we print or write."""
    if options.token_file is None:
        return {}
    from qlorax.ops.secrets import read_token_file

    return {"HF_TOKEN": read_token_file(options.token_file)}


def refuse_secrets_in_config(config: QloraxConfig) -> None:
    """Exit 2 naming the key when a config value holds a Hugging Face token (HF_TOKEN,
    HUGGINGFACE_TOKEN or --token-file's): the config is copied into deterministic artifacts,
    which cannot be redacted without changing their bits. Call after `secret_environment`
    (which registers the token file's value) and before anything is written."""
    from qlorax.ops.secrets import keys_holding_secrets

    if keys := keys_holding_secrets(config.canonical()):
        raise ConfigError(f"config key(s) {', '.join(keys)} hold the value of a secret (a Hugging Face token "
                          "from HF_TOKEN, HUGGINGFACE_TOKEN or --token-file); it would be written into the run's "
                          "artifacts. Remove it from the config; pass tokens only with --token-file.")


def cache_key(config: QloraxConfig, inputs: ResolvedInputs) -> CacheKey:
    """The run's cache key; it carries its material to `store_in_cache`, so `qlorax cache ls`
    can show the profile and config hash of every entry."""
    from qlorax.model import model_cache_identity
    from qlorax.ops.cache import CacheManager

    return CacheManager().key_for(inputs.config_hash, {"train": str(inputs.data_sha256)},
                                  model_cache_identity(config.model), __version__, config.determinism.profile)


def cached_run(key: str) -> Path | None:
    """The cache's intact run for this key, verified once (a corrupted entry is dropped), or None."""
    from qlorax.ops.cache import CacheManager

    return CacheManager().lookup(key)


def restore_from_cache(key: str, output_dir: Path, source: Path) -> bool:
    """The verified cache hit `source` copied into output_dir; the copy is checked against its
    manifest (an entry removed meanwhile is a miss: the run trains)."""
    from qlorax.ops.cache import CacheManager

    return CacheManager().restore(key, output_dir, source)


def store_in_cache(key: CacheKey, run_dir: Path) -> None:
    """Store a finished run under its key (with the key's material); a failure only warns."""
    from qlorax.ops.cache import CacheManager

    try:
        CacheManager().store(key, run_dir)
    except (OSError, QloraxError) as exc:  # a cache that can't be written must not fail a good run
        print(f"warning: could not store the run in the cache: {exc}", file=sys.stderr)


def audit_logger(options: RunOptions, directory: Path) -> Any:
    """`--audit-log`, else audit.jsonl in `directory` (train: the parent of its output directory;
    verify: its output directory, the parent of every run-XX)."""
    from qlorax.ops.audit import AuditLogger

    path = options.audit_log or Path(directory).resolve() / AUDIT_LOG
    return AuditLogger(path, environment=options.environment)


def redacted_config(config: QloraxConfig) -> dict[str, Any]:
    from qlorax.ops.secrets import redact

    return redact(config.canonical())


def read_status(run_dir: Path) -> str | None:
    """The `status` training_metadata.json records (failed, interrupted, complete), if readable."""
    from qlorax.layout import METADATA

    try:
        metadata = read_json(Path(run_dir) / METADATA)
    except (OSError, ValueError):
        return None
    return str(metadata.get("status")) if isinstance(metadata, dict) else None


def log_run_outcome(audit: Any, run_dir: Path, exit_code: int, cache_hit: bool = False) -> None:
    if exit_code == 0:
        results = read_json(run_dir / RESULTS)
        manifest = load_manifest(run_dir) or {}
        audit.log_training_complete({**results, "cache_hit": cache_hit}, manifest, run_dir)
    else:
        audit.log_event("training_failed", run_dir=str(run_dir), exit_code=exit_code)


def record_metrics(options: RunOptions, run_dirs: list[Path], exit_codes: list[int],
                   score: float | None = None) -> None:
    """Record runs (and a verification score) and push / write them when asked."""
    if not (options.pushgateway or options.metrics_textfile):
        return
    from qlorax.fingerprint import detect_environment_kind
    from qlorax.ops.metrics import MetricsPushError, TrainingMetrics, default_grouping_key

    environment = options.environment or detect_environment_kind()
    metrics = TrainingMetrics()
    for run_dir, code in zip(run_dirs, exit_codes, strict=True):
        if not metrics.record_run_dir(run_dir, environment):  # no metadata at all: count a failure
            metrics.record_run(environment, 0.0, success=code == 0)
    if score is not None:
        metrics.record_score(environment, score)
    if options.metrics_textfile:
        metrics.write_textfile(options.metrics_textfile)
    if options.pushgateway:
        try:
            metrics.push(options.pushgateway, grouping_key=default_grouping_key())
        except MetricsPushError as exc:
            from qlorax.ops.secrets import scrub_text

            print(f"warning: {scrub_text(exc.message)}", file=sys.stderr)


def check_tracking(options: RunOptions) -> None:
    """Before any training: --mlflow-uri needs the mlflow extra (exit 3 naming it, nothing trained)."""
    if options.mlflow_uri:
        from qlorax.tracking import require_mlflow, split_credentials

        split_credentials(options.mlflow_uri)  # registers a password in the URI as a secret first
        require_mlflow()


def record_tracking(options: RunOptions, run_dirs: list[Path], exit_codes: list[int],
                    report: dict[str, Any] | None = None, report_path: Path | None = None) -> None:
    """Log the runs (and a verification) to MLflow when --mlflow-uri is given; a failure only
    warns, like a failed Pushgateway push: the runs themselves are good."""
    if not options.mlflow_uri:
        return
    from qlorax.tracking import TrackingError, log_runs, shown_uri

    try:
        ids = log_runs(options.mlflow_uri, run_dirs, exit_codes, report, report_path)
    except TrackingError as exc:
        from qlorax.ops.secrets import scrub_text

        print(f"warning: {scrub_text(exc.message)}", file=sys.stderr)
        return
    print(f"MLflow: logged {len(ids)} run(s) to {shown_uri(options.mlflow_uri)} (run id {ids[0] if ids else '-'})",
          file=sys.stderr)
