"""Prometheus metrics for training runs, with the user's guide's names and labels.

Each `TrainingMetrics` owns its own `CollectorRegistry` (never the global default one), so
that a batch process pushes exactly its own series and tests never see each other's.

How the numbers get out depends on how long the process lives:
* `qlorax serve` (long-running) exposes the registry on /metrics for Prometheus to scrape;
* `qlorax train` / `verify` (batch) `push` to a Pushgateway and/or `write_textfile` for
  node-exporter's textfile collector. A pushed group is replaced on each push, so a
  pushed counter counts the runs of that one process (1), as batch-job metrics do.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import push_to_gateway, write_to_textfile

from qlorax import __version__
from qlorax.errors import QloraxError
from qlorax.fingerprint import detect_environment_kind
from qlorax.layout import ENV, MANIFEST, METADATA

ENVIRONMENTS = ("native", "docker", "kubernetes")
# Training runs last seconds (tests) to hours (real fine-tunes).
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, float("inf"))


class MetricsPushError(QloraxError):
    """The Pushgateway could not be reached or refused the push."""


class TrainingMetrics:
    """The training metrics of one process, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.runs_total = Counter(
            "reproducible_training_runs_total",
            "Total number of reproducible training runs",
            ["environment", "status"],
            registry=r,
        )
        self.restarts_total = Counter(
            "reproducible_training_restarts_total",
            "Automatic restarts of training runs after a lost worker or node (--max-restarts)",
            ["environment"],
            registry=r,
        )
        self.duration = Histogram(
            "reproducible_training_duration_seconds",
            "Duration of reproducible training runs",
            ["environment"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.score = Gauge(
            "reproducibility_score", "Reproducibility score (0-1)", ["environment"], registry=r
        )
        self.last_success = Gauge(
            "reproducible_training_last_success_timestamp_seconds",
            "Unix time of the last successful training run",
            ["environment"],
            registry=r,
        )
        self.tokens_per_second = Gauge(
            "reproducible_training_tokens_per_second",
            "Training throughput of the last run, in tokens per second",
            ["environment"],
            registry=r,
        )
        self.peak_memory = Gauge(
            "reproducible_training_peak_memory_bytes",
            "Peak resident memory of the last run",
            ["environment"],
            registry=r,
        )
        self.build = Info("qlorax_build", "qlorax version", registry=r)
        self.build.info({"version": __version__})

    def record_run(
        self,
        environment: str,
        duration_s: float,
        success: bool,
        score: float | None = None,
        tokens_per_second: float | None = None,
        peak_memory_mb: float | None = None,
        finished_at: float | None = None,
    ) -> None:
        """Count one finished run and record its duration and, when known, score/throughput/memory."""
        status = "success" if success else "failure"
        self.runs_total.labels(environment=environment, status=status).inc()
        self.duration.labels(environment=environment).observe(max(0.0, float(duration_s)))
        if success:
            self.last_success.labels(environment=environment).set(finished_at or time.time())
        if score is not None:
            self.record_score(environment, score)
        if tokens_per_second is not None:
            self.tokens_per_second.labels(environment=environment).set(float(tokens_per_second))
        if peak_memory_mb is not None:
            self.peak_memory.labels(environment=environment).set(float(peak_memory_mb) * 1024 * 1024)

    def record_score(self, environment: str, score: float) -> None:
        """Set the reproducibility score (0-1) of the last verification."""
        score = float(score)
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"reproducibility score must be within [0, 1], got {score}")
        self.score.labels(environment=environment).set(score)

    def record_run_dir(self, run_dir: Path, environment: str | None = None) -> bool:
        """Record a finished run from its directory (training_metadata.json); False if not finished.

        `environment` overrides the one the run recorded in env.json; a run that recorded none
        gets this machine's (`qlorax.fingerprint.detect_environment_kind`, as env.json does)."""
        summary = run_summary(run_dir)
        if summary is None:
            return False
        self.record_summary(summary, environment or summary["environment"] or detect_environment_kind())
        return True

    def record_summary(self, summary: dict[str, Any], environment: str) -> None:
        """Record one run from its `run_summary` under `environment`."""
        self.record_run(environment, summary["duration_s"], summary["success"],
                        tokens_per_second=summary["tokens_per_second"], peak_memory_mb=summary["peak_memory_mb"],
                        finished_at=summary["finished_at"])
        if summary.get("restarts"):
            self.restarts_total.labels(environment=environment).inc(summary["restarts"])

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (what /metrics returns)."""
        return generate_latest(self.registry)

    def push(
        self, url: str, job: str = "qlorax", grouping_key: dict[str, str] | None = None, timeout: float = 10.0
    ) -> None:
        """Replace this job's group on a Pushgateway with our series (batch train/verify).

        Credentials in the URL (http://user:pass@host/) are sent as HTTP basic auth, registered
        as secrets and never shown: messages name the URL without them."""
        from qlorax.ops.secrets import scrub_text

        url, handler = _auth_from_url(url)
        try:
            push_to_gateway(url, job=job, registry=self.registry, grouping_key=grouping_key, timeout=timeout,
                            handler=handler)
        except (OSError, ValueError) as exc:  # URLError is an OSError
            raise MetricsPushError(scrub_text(f"could not push metrics to the Pushgateway at {url}: {exc}")) from None

    def write_textfile(self, path: Path | str) -> None:
        """Write the node-exporter textfile-collector file atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry)


def _auth_from_url(url: str) -> tuple[str, Any]:
    """(the URL without user:password@, a prometheus_client push handler sending them as basic auth)."""
    from urllib.parse import urlsplit, urlunsplit

    from prometheus_client.exposition import basic_auth_handler, default_handler

    from qlorax.ops.secrets import register_secret

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, default_handler
    username, password = parts.username or "", parts.password or ""
    register_secret(password or username)
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))

    def handler(url: str, method: str, timeout: float | None, headers: list[tuple[str, str]], data: bytes) -> Any:
        return basic_auth_handler(url, method, timeout, headers, data, username, password)

    return bare, handler


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def run_summary(run_dir: Path) -> dict[str, Any] | None:
    """What the metrics need from a run directory, or None while the run is not over.

    A run is over when its manifest exists (success) or its training_metadata.json says
    failed/interrupted (failure). Uses only the informational files; never re-hashes."""
    run_dir = Path(run_dir)
    meta = _read_json(run_dir / METADATA) or {}
    finished = (run_dir / MANIFEST).is_file()
    status = str(meta.get("status", "complete" if finished else "")).lower()
    if finished and status in ("complete", "completed", "success"):
        success = True
    elif status in ("failed", "failure", "error", "interrupted", "aborted"):
        success = False
    else:
        return None
    env = _read_json(run_dir / ENV) or {}
    return {
        "run_dir": str(run_dir),
        "success": success,
        "environment": env.get("environment") if isinstance(env.get("environment"), str) else None,
        "duration_s": _number(meta.get("duration_seconds")) or 0.0,
        "tokens_per_second": _number(meta.get("tokens_per_second")),
        "peak_memory_mb": _number(meta.get("peak_memory_mb")),
        "finished_at": _parse_time(meta.get("finished_at")),
        "restarts": len(meta["restarts"]) if isinstance(meta.get("restarts"), list) else 0,
    }


def report_score(path: Path) -> tuple[float, str | None] | None:
    """(score, environment) from a verification report JSON with a top-level reproducibility_score."""
    data = _read_json(Path(path))
    if data is None:
        return None
    score = _number(data.get("reproducibility_score"))
    if score is None and isinstance(data.get("summary"), dict):
        score = _number(data["summary"].get("reproducibility_score"))
    if score is None or not 0.0 <= score <= 1.0:
        return None
    env = data.get("environment")
    return score, env if isinstance(env, str) and env else None


class RunDirWatcher:
    """Polls a directory for finished runs and verification reports and records each once.

    Used by `qlorax serve --watch-dir`: each direct subdirectory that is a finished (or
    failed) run is counted once per training_metadata.json version; each *.json report
    directly in the directory sets the score."""

    def __init__(self, metrics: TrainingMetrics, watch_dir: Path, environment: str | None = None):
        self.metrics = metrics
        self.watch_dir = Path(watch_dir)
        self.environment = environment
        self._seen: dict[str, tuple[float, int]] = {}

    def _stamp(self, path: Path) -> tuple[float, int] | None:
        try:
            info = path.stat()
        except OSError:
            return None
        return info.st_mtime, info.st_size

    def poll(self) -> int:
        """Record what is new since the last poll; returns how many runs/reports were recorded."""
        recorded = 0
        try:
            children = sorted(self.watch_dir.iterdir())
        except OSError:
            return 0
        for child in children:
            if child.is_dir():
                marker = child / MANIFEST
                if not marker.is_file():
                    marker = child / METADATA
                stamp = self._stamp(marker)
                key = str(child)
                if stamp is None or self._seen.get(key) == stamp:
                    continue
                summary = run_summary(child)
                if summary is None:
                    continue
                self._seen[key] = stamp
                self.metrics.record_summary(summary, summary["environment"] or self.environment
                                            or detect_environment_kind())
                recorded += 1
            elif child.suffix == ".json" and child.is_file():
                stamp = self._stamp(child)
                key = str(child)
                if stamp is None or self._seen.get(key) == stamp:
                    continue
                found = report_score(child)
                self._seen[key] = stamp
                if found is not None:
                    score, env = found
                    self.metrics.record_score(env or self.environment or detect_environment_kind(), score)
                    recorded += 1
        return recorded


def default_grouping_key() -> dict[str, str]:
    """A grouping key that keeps different hosts' pushes apart: {"instance": hostname}."""
    return {"instance": socket.gethostname()}
