"""Experiment tracking on an MLflow server (the optional extra `qlorax[mlflow]`).

`train`/`verify --mlflow-uri URI` log each finished run: its resolved config as params, the
per-step trace and the final losses as metrics, the config hash and the digests as tags, and the
run's files as artifacts; a verification is a parent run (score, report) over its runs.
The client here is shared with `publish --to mlflow` (`qlorax.publish.mlflow`), which registers
the published snapshot as a model version with the digests as tags.

mlflow is imported only inside `mlflow_client`, so no other command pays for it (or needs it). Credentials
in the URI (`https://user:password@host`) never reach mlflow's own messages: they are taken out of
the URI, handed over as MLFLOW_TRACKING_USERNAME/PASSWORD for the duration of the calls, and the
password is registered as a secret so that every message we print is scrubbed of it.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from qlorax import __version__, layout, settings
from qlorax.artifacts import load_manifest, read_json
from qlorax.errors import EXIT_RESOURCES, QloraxError

DEFAULT_EXPERIMENT = "qlorax"
ARTIFACT_RUN_DIR = "run"  # where a run directory's files go among the MLflow run's artifacts
_BATCH = 100  # MLflow's log_batch limit for params and tags (metrics: 1000)


class TrackingError(QloraxError):
    """The MLflow server cannot be reached or refused a call, or mlflow is not installed."""

    exit_code = EXIT_RESOURCES


def require_mlflow() -> None:
    """Fail before any training when --mlflow-uri is given but the extra is missing."""
    if importlib.util.find_spec("mlflow") is None:
        raise TrackingError("--mlflow-uri needs the mlflow extra: pip install 'qlorax[mlflow]' "
                            "(`make install` installs it).")


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(the URI without user:password@, user, password); the password is registered as a secret."""
    from qlorax.ops.secrets import register_secret

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, None, None
    password = unquote(parts.password) if parts.password is not None else None
    register_secret(password)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), \
        unquote(parts.username or ""), password


def shown_uri(uri: str) -> str:
    """The URI as messages may show it: without its credentials."""
    return split_credentials(uri)[0]


# mlflow's own retry settings, used where the user set none: its defaults (7 retries, back-off
# factor 2, 120 s per request) kept `publish --to mlflow` to an unreachable server busy for ~249 s
# (measured) before the error; these give up after about 7 s of back-off (1 + 2 + 4).
RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@contextmanager
def mlflow_client(uri: str) -> Iterator[Any]:
    """An MlflowClient for `uri`, credentials passed through mlflow's environment variables only
    while the block runs (restored afterwards: child processes never inherit them), with
    bounded retries unless the user set mlflow's own (RETRY_DEFAULTS)."""
    require_mlflow()
    clean, user, password = split_credentials(uri)
    overrides = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password} if user is not None else {}
    overrides.update({key: value for key, value in RETRY_DEFAULTS.items() if settings.get(key) is None})
    with settings.temporary_environ(overrides):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            yield MlflowClient(tracking_uri=clean, registry_uri=clean)
        except MlflowException as exc:
            raise TrackingError(f"MLflow at {clean}: {_message(exc)}") from None
        except OSError as exc:  # requests' connection errors are OSErrors
            raise TrackingError(f"cannot reach MLflow at {clean}: {_message(exc)}") from None


def _message(exc: BaseException) -> str:
    from qlorax.ops.secrets import scrub_text

    lines = str(exc).strip().splitlines()
    return scrub_text(lines[0] if lines else exc.__class__.__name__)


def experiment_id(client: Any) -> str:
    """The id of the experiment runs go to ($MLFLOW_EXPERIMENT_NAME, else qlorax), created when missing."""
    name = settings.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"training": {"seed": 42}} -> {"training.seed": "42"}; lists and None as JSON."""
    flat: dict[str, str] = {}
    for key, value in sorted(mapping.items()):
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return flat


def run_tags(run_dir: Path) -> dict[str, str]:
    """The digests and identities of a finished run directory, as `qlorax.*` tags."""
    env = read_json(run_dir / layout.ENV) if (run_dir / layout.ENV).is_file() else {}
    return tags_of(read_json(run_dir / layout.RESULTS), load_manifest(run_dir) or {}, env)


def tags_of(results: dict[str, Any], manifest: dict[str, Any], env: dict[str, Any]) -> dict[str, str]:
    """The digests and identities of a finished run (its results, manifest and env), as `qlorax.*` tags."""
    base, data = results.get("base_model") or {}, results.get("data") or {}
    tags = {
        "qlorax.config_hash": results.get("config_hash"),
        "qlorax.adapter_sha256": manifest.get("files", {}).get(layout.ADAPTER_WEIGHTS, {}).get("sha256"),
        "qlorax.deterministic_digest": manifest.get("deterministic_digest"),
        "qlorax.data_sha256": data.get("sha256"),
        "qlorax.base_model": base.get("id"),
        "qlorax.base_model_digest": base.get("digest"),
        "qlorax.profile": env.get("profile"),
        "qlorax.threads": env.get("threads"),
        "qlorax.environment_fingerprint": env.get("fingerprint_sha256"),
        "qlorax.version": __version__,
    }
    return {key: str(value) for key, value in tags.items() if value is not None}


def _trace_metrics(run_dir: Path, results: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(key, value, step): every traced step's loss, grad norm, lr and tokens, the eval history, and
    the final losses at the last step."""
    metrics: list[tuple[str, float, int]] = []
    trace = run_dir / layout.TRACE
    for line in trace.read_text(encoding="utf-8").splitlines() if trace.is_file() else []:
        record = json.loads(line)
        step = int(record[layout.TRACE_STEP])
        for key in (layout.TRACE_LOSS, layout.TRACE_GRAD_NORM, layout.TRACE_LR, layout.TRACE_TOKENS,
                    layout.TRACE_EVAL_LOSS):
            if isinstance(record.get(key), int | float):
                metrics.append((f"train/{key}" if key != layout.TRACE_EVAL_LOSS else "eval_loss",
                                float(record[key]), step))
    for entry in results.get("eval_history") or []:
        for key in ("eval_loss", "eval_perplexity"):
            if isinstance(entry.get(key), int | float):
                metrics.append((key, float(entry[key]), int(entry.get("step", 0))))
    last = int(results.get("steps", 0))
    for key in ("train_loss", "train_perplexity", "final_train_loss"):
        if isinstance(results.get(key), int | float):
            metrics.append((key, float(results[key]), last))
    return metrics


def _log_run_dir(client: Any, run_id: str, run_dir: Path) -> None:
    """Params, metrics, tags and artifacts of one finished run directory into an MLflow run."""
    from mlflow.entities import Metric, Param, RunTag

    results = read_json(run_dir / layout.RESULTS)
    resolved = read_json(run_dir / layout.RESOLVED_CONFIG)
    params = [Param(k, v[:6000]) for k, v in flatten(resolved.get("config") or {}).items()]
    tags = [RunTag(k, v) for k, v in run_tags(run_dir).items()]
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v, step in _trace_metrics(run_dir, results)]
    for start in range(0, max(len(params), len(tags), len(metrics)), _BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + _BATCH], params=params[start:start + _BATCH],
                         tags=tags[start:start + _BATCH])
    manifest = load_manifest(run_dir) or {}
    for rel in [*sorted(manifest.get("files", {})), layout.MANIFEST]:
        parent = Path(rel).parent.as_posix()
        client.log_artifact(run_id, str(run_dir / rel),
                            ARTIFACT_RUN_DIR if parent == "." else f"{ARTIFACT_RUN_DIR}/{parent}")


def log_runs(uri: str, run_dirs: list[Path], exit_codes: list[int], report: dict[str, Any] | None = None,
             report_path: Path | None = None) -> list[str]:
    """Log finished runs (a failed one as a FAILED run with its exit code); a verification (report
    given) becomes a parent run with the score and the report, its runs nested under it. Returns
    the MLflow run ids, the parent's first."""
    ids: list[str] = []
    with mlflow_client(uri) as client:
        experiment = experiment_id(client)
        parent_tags: dict[str, str] = {}
        if report is not None:
            score = layout.report_get(report, layout.REPORT_SCORE, None)
            parent = client.create_run(experiment, run_name="qlorax verify", tags={
                "qlorax.kind": "verification", "qlorax.runs": str(len(run_dirs)),
                "qlorax.reference_digest": str(layout.report_get(report, layout.REPORT_METRICS, {})
                                               .get("reference_digest"))})
            if isinstance(score, int | float):
                client.log_metric(parent.info.run_id, "reproducibility_score", float(score))
            if report_path is not None and Path(report_path).is_file():
                client.log_artifact(parent.info.run_id, str(report_path))
            ids.append(parent.info.run_id)
            parent_tags = {"mlflow.parentRunId": parent.info.run_id}
        for run_dir, code in zip(run_dirs, exit_codes, strict=True):
            run = client.create_run(experiment, run_name=Path(run_dir).name,
                                    tags={"qlorax.kind": "training", "qlorax.exit_code": str(code), **parent_tags})
            if code == 0:
                _log_run_dir(client, run.info.run_id, Path(run_dir))
            client.set_terminated(run.info.run_id, "FINISHED" if code == 0 else "FAILED")
            ids.append(run.info.run_id)
        if ids and report is not None:
            client.set_terminated(ids[0], "FINISHED")
    return ids

