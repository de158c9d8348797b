"""Health checks and `qlorax serve`: /metrics for Prometheus, /health, /livez, /readyz.

Every check runs in-process and is cheap (no subprocess per request, no torch import):

* `determinism`: the environment the launcher would give a training child is valid for the
  profile (`qlorax.determinism.child_environment` + `validate_environment`), and the CPU
  supports the profile;
* `artifact_dir_writable`: a probe file can be created, fsynced and removed there;
* `memory_available`, `disk_free`: enough free memory, and free disk under the artifact dir.

/health answers 200 or 500 with the guide's JSON (status, timestamp, version; the failing
checks under "error" and "failed_checks"). /livez answers 200 while the process serves
(no checks: a full disk must not get the process restarted); /readyz 200 or 503 with the
same checks as /health. Both servers bind 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from flask import Flask, Response, jsonify

from qlorax import __version__, settings
from qlorax.artifacts import utc_now
from qlorax.errors import QloraxError
from qlorax.profiles import profile_name_from_env

if TYPE_CHECKING:
    from qlorax.ops.metrics import TrainingMetrics

Check = tuple[bool, str]


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


class HealthChecker:
    """Computes the health document; results are cached for `cache_seconds` to bound the cost of polling."""

    def __init__(
        self,
        artifact_dir: Path | str,
        min_free_memory_mb: float = 256.0,
        min_free_disk_mb: float = 1024.0,
        profile: str | None = None,
        threads: int | None = None,
        cache_seconds: float = 1.0,
    ):
        self.artifact_dir = Path(artifact_dir)
        self.min_free_memory_mb = float(min_free_memory_mb)
        self.min_free_disk_mb = float(min_free_disk_mb)
        self.profile = profile_name_from_env(profile)
        self.threads = threads
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    # -- individual checks ------------------------------------------------------------
    def check_determinism(self) -> Check:
        """The launcher can start a correctly pinned training child for the profile, and the CPU
        supports it (portable needs AVX2). Checked in-process: no subprocess per request."""
        from qlorax.cpuid import cpu_info
        from qlorax.determinism import PROFILES, child_environment, validate_environment

        if self.profile not in PROFILES:
            return False, f"unknown profile {self.profile!r}; expected one of {', '.join(PROFILES)}"
        threads = self.threads or (os.cpu_count() or 1)
        env, _removed = child_environment(settings.environ(), self.profile, threads)
        valid, messages = validate_environment(env)
        cpu = cpu_info()
        if self.profile == "portable" and cpu["machine"] == "x86_64" and "avx2" not in cpu["cpu_isa_flags"]:
            valid, messages = False, [*messages, "the portable profile pins AVX2, which this CPU lacks"]
        where = f"a launched child (profile {self.profile}, {threads} threads)"
        return bool(valid), f"{where}: " + "; ".join(messages or ["valid"])

    def check_artifact_dir(self) -> Check:
        """The artifact directory exists and accepts a new file (as root, mode bits do not tell)."""
        directory = self.artifact_dir
        if not directory.is_dir():
            return False, f"{directory} does not exist or is not a directory"
        try:
            with tempfile.NamedTemporaryFile(prefix=".qlorax-health-", dir=directory) as probe:
                probe.write(b"ok")
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as exc:
            return False, f"{directory} is not writable: {exc.strerror or exc}"
        return True, f"{directory} is writable"

    def check_memory(self) -> Check:
        available_mb = psutil.virtual_memory().available / 2**20
        ok = available_mb >= self.min_free_memory_mb
        return ok, f"{available_mb:.0f} MiB available, {self.min_free_memory_mb:g} MiB required"

    def check_disk(self) -> Check:
        where = _nearest_existing(self.artifact_dir)
        try:
            free_mb = shutil.disk_usage(where).free / 2**20
        except OSError as exc:
            return False, f"cannot stat the file system of {where}: {exc.strerror or exc}"
        ok = free_mb >= self.min_free_disk_mb
        return ok, f"{free_mb:.0f} MiB free at {where}, {self.min_free_disk_mb:g} MiB required"

    # -- the document -----------------------------------------------------------------
    def check(self) -> dict[str, Any]:
        """The guide's health JSON, with every check's result under "checks"."""
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            result = self._compute()
            self._cached = (now, result)
            return result

    def _compute(self) -> dict[str, Any]:
        checks: dict[str, dict[str, Any]] = {}
        runners: dict[str, Callable[[], Check]] = {
            "determinism": self.check_determinism,
            "artifact_dir_writable": self.check_artifact_dir,
            "memory_available": self.check_memory,
            "disk_free": self.check_disk,
        }
        for name, run in runners.items():
            try:
                ok, detail = run()
            except Exception as exc:  # a check that crashes is a failing check, not a 500 page
                ok, detail = False, f"check raised {exc.__class__.__name__}: {exc}"
            checks[name] = {"ok": bool(ok), "detail": detail}
        failed = [name for name, result in checks.items() if not result["ok"]]
        document: dict[str, Any] = {
            "status": "unhealthy" if failed else "healthy",
            "timestamp": utc_now(),
            "version": __version__,
            "checks": checks,
        }
        if failed:
            document["failed_checks"] = failed
            document["error"] = "; ".join(f"{name}: {checks[name]['detail']}" for name in failed)
        return document


def create_app(checker: HealthChecker) -> Flask:
    """The Flask app with /health (200/500), /livez (200) and /readyz (200/503)."""
    app = Flask("qlorax.health")
    app.json.sort_keys = True  # type: ignore[attr-defined]

    @app.get("/health")
    def health() -> tuple[Response, int]:
        document = checker.check()
        return jsonify(document), 200 if document["status"] == "healthy" else 500

    @app.get("/livez")
    def livez() -> tuple[Response, int]:
        return jsonify({"status": "alive", "timestamp": utc_now(), "version": __version__}), 200

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        document = checker.check()
        ready = document["status"] == "healthy"
        body = {
            "status": "ready" if ready else "not ready",
            "timestamp": document["timestamp"],
            "version": __version__,
        }
        if not ready:
            body["failed_checks"] = document["failed_checks"]
            body["error"] = document["error"]
        return jsonify(body), 200 if ready else 503

    return app


# Both servers: waitress with bounds, so that slow or hostile clients cannot stall /livez (a
# liveness probe that stalls gets the pod killed). Waitress reads a request fully before a
# worker thread sees it, so slow clients hold a connection slot, never a thread; slots are
# bounded, idle connections are closed, oversized headers are answered 431 at once.
SERVER_SETTINGS: dict[str, Any] = {
    "threads": 4,
    "connection_limit": 500,  # shared by both ports; below the usual 1024 file descriptors
    "channel_timeout": 10,  # seconds without activity before a connection is closed
    "cleanup_interval": 2,  # how often idle connections are looked for
    "max_request_header_size": 16 * 1024,
    "max_request_body_size": 64 * 1024,  # no endpoint takes a body
    "asyncore_use_poll": True,  # select() cannot watch more than 1024 descriptors
    "ident": "qlorax",
    "clear_untrusted_proxy_headers": True,
}
METRICS_PATH = "/metrics"


def metrics_app(registry: Any) -> Callable[..., Any]:
    """A WSGI app serving the registry's exposition on /metrics only (404 for any other path)."""
    from prometheus_client import make_wsgi_app

    exposition = make_wsgi_app(registry)
    not_found = f"not found: the metrics are served on {METRICS_PATH}\n".encode()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") == METRICS_PATH and environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            return exposition(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(not_found)))])
        return [not_found]

    return app


SUPPORTED_HTTP = ("1.0", "1.1")
UNSUPPORTED_HTTP_BODY = b"HTTP version not supported: use HTTP/1.1\n"


def version_checking_channel() -> type:
    """A waitress channel whose requests in an HTTP version other than 1.0/1.1 (HTTP/9.9, 2.0 in
    plain text) are answered 505 and closed. Waitress itself would serve them as HTTP/1.0, and
    by then the WSGI environ no longer says which version was asked for."""
    from waitress.channel import HTTPChannel
    from waitress.task import WSGITask

    class VersionCheckingTask(WSGITask):
        def execute(self) -> None:
            if self.request.version in SUPPORTED_HTTP:
                super().execute()
                return
            self.status = "505 HTTP Version Not Supported"
            self.response_headers.append(("Content-Type", "text/plain; charset=utf-8"))
            self.set_close_on_finish()
            self.content_length = len(UNSUPPORTED_HTTP_BODY)
            self.complete = True
            self.write(UNSUPPORTED_HTTP_BODY)

    class VersionCheckingChannel(HTTPChannel):
        task_class = VersionCheckingTask

    return VersionCheckingChannel


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the servers off the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _create_servers(host: str, metrics_port: int, health_port: int, metrics: TrainingMetrics,
                    checker: HealthChecker) -> tuple[Any, Any]:
    """The /metrics and health servers on one socket map (health_server.run() serves both ports);
    a port that cannot be bound is one QloraxError naming it."""
    import waitress

    sockets: dict[Any, Any] = {}
    try:
        metrics_server = waitress.create_server(metrics_app(metrics.registry), map=sockets,
                                                host=host, port=metrics_port, **SERVER_SETTINGS)
    except OSError as exc:
        raise QloraxError(f"cannot serve /metrics on {host}:{metrics_port}: {exc.strerror or exc}") from None
    try:
        health_server = waitress.create_server(create_app(checker), map=sockets, host=host,
                                               port=health_port, **SERVER_SETTINGS)
    except OSError as exc:
        metrics_server.close()
        raise QloraxError(f"cannot serve /health on {host}:{health_port}: {exc.strerror or exc}") from None
    channel = version_checking_channel()
    metrics_server.channel_class = health_server.channel_class = channel
    return metrics_server, health_server


def _start_watcher(metrics: TrainingMetrics, watch_dir: Path | str | None, environment: str | None,
                   interval: float, stop: threading.Event) -> threading.Thread | None:
    """A daemon thread recording what appears in --watch-dir every `interval` seconds until `stop`."""
    from qlorax.ops.metrics import RunDirWatcher

    if watch_dir is None:
        return None
    watcher = RunDirWatcher(metrics, Path(watch_dir), environment)

    def watch() -> None:
        while not stop.is_set():
            try:
                watcher.poll()
            except Exception as exc:  # keep serving; say what went wrong
                print(f"qlorax serve: watch-dir poll failed: {exc}", file=sys.stderr, flush=True)
            stop.wait(interval)

    thread = threading.Thread(target=watch, name="qlorax-watch", daemon=True)
    thread.start()
    return thread


def _stop_on_signals(stop: threading.Event) -> dict[int, Any]:
    """SIGTERM/SIGINT end the serving loop (main thread only); returns the handlers they replaced."""

    def shutdown(signum: int, _frame: Any) -> None:
        # waitress's run() loop ends cleanly on SystemExit (as on Ctrl-C) and stops its threads.
        stop.set()
        raise SystemExit(0)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, shutdown)
    return previous


def _prepare_artifact_dir(artifact_dir: Path, host: str, announce: Callable[[str], None]) -> None:
    """Create the artifact directory and warn about a non-loopback bind; neither is fatal."""
    try:
        artifact_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # reported by /health, not fatal: the server shows why it is unhealthy
        announce(f"warning: cannot create artifact directory {artifact_dir}: {exc.strerror or exc}")
    if not is_loopback(host):
        announce(
            f"warning: binding {host}: /metrics and /health are unauthenticated and now reachable "
            "from the network"
        )


def serve(
    host: str = "127.0.0.1",
    metrics_port: int = 8000,
    health_port: int = 8080,
    artifact_dir: Path | str = "runs",
    *,
    metrics: TrainingMetrics | None = None,
    watch_dir: Path | str | None = None,
    watch_interval: float = 15.0,
    environment: str | None = None,
    min_free_memory_mb: float = 256.0,
    min_free_disk_mb: float = 1024.0,
    profile: str | None = None,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve /metrics (prometheus_client's exposition) and the health endpoints (Flask), both on
    one bounded waitress loop (SERVER_SETTINGS), until SIGTERM/SIGINT.

    Port 0 picks a free port; the bound addresses are announced in one line
    ("serving metrics=http://H:P/metrics health=http://H:P/health") so scripts can read them."""
    from qlorax.ops.metrics import TrainingMetrics

    announce = announce or (lambda line: print(line, flush=True))
    metrics = metrics if metrics is not None else TrainingMetrics()
    artifact_dir = Path(artifact_dir)
    _prepare_artifact_dir(artifact_dir, host, announce)
    checker = HealthChecker(artifact_dir, min_free_memory_mb, min_free_disk_mb, profile=profile)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth is N" on every busy moment
    metrics_server, health_server = _create_servers(host, metrics_port, health_port, metrics, checker)
    stop = threading.Event()
    watcher_thread = _start_watcher(metrics, watch_dir, environment, watch_interval, stop)
    previous = _stop_on_signals(stop)
    display_host = f"[{host}]" if ":" in host else host
    announce(
        f"serving metrics=http://{display_host}:{metrics_server.effective_port}/metrics "
        f"health=http://{display_host}:{health_server.effective_port}/health"
    )
    try:
        health_server.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        stop.set()
        for server in (health_server, metrics_server):
            with contextlib.suppress(Exception):
                server.task_dispatcher.shutdown()
                server.close()
        if watcher_thread is not None:
            watcher_thread.join(timeout=5)
