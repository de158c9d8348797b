"""Fixtures for the ops tests: real Prometheus, Pushgateway and `qlorax serve` processes.

Every service listens on a free 127.0.0.1 port, is waited for with a bounded wait, and is
stopped (SIGTERM, then SIGKILL) in teardown. The Prometheus binaries come from Debian's
`prometheus` / `prometheus-pushgateway` packages; when they are missing the session runs
scripts/install_test_services.sh once and *fails* (never skips) if they are still missing.

For an end-to-end test after a real training run:

    def test_e2e(prometheus_server, qlorax_serve, tmp_path):
        serve = qlorax_serve(watch_dir=runs_dir)
        prom = prometheus_server([serve.metrics_target])
        prom.wait_for('reproducible_training_runs_total{status="success"}')
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from qlorax.artifacts import pretty_json, write_manifest
from qlorax.layout import CHECKPOINTS_DIR, LOCK

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "scripts" / "install_test_services.sh"
BINARIES = ("prometheus", "prometheus-pushgateway", "promtool")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


# -- helpers -------------------------------------------------------------------------------
def _free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (callers retry if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "") -> Any:
    """Poll until `predicate()` is truthy (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (OSError, ValueError) as exc:  # not up yet
            last_error, value = exc, None
        if value:
            return value
        time.sleep(interval)
    pytest.fail(
        f"timed out after {timeout:.0f}s waiting for {what or predicate}"
        + (f" (last error: {last_error})" if last_error else "")
    )


@dataclass
class Service:
    """A started process, its log file, and how to stop it."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> int:
        """SIGTERM, bounded wait, SIGKILL; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        return self.process.returncode


def _start(
    name: str, argv: list[str], log_path: Path, ready: Callable[[], bool], env: dict[str, str] | None = None
) -> Service:
    log_handle = open(log_path, "wb")
    try:
        process = subprocess.Popen(
            argv,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    finally:
        log_handle.close()
    service = Service(name, process, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {process.returncode} during start-up:\n{service.log_tail()}"
            )
        try:
            if ready():
                return service
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    service.stop()
    pytest.fail(f"{name} was not ready within {START_TIMEOUT:.0f}s:\n{service.log_tail()}")


def _start_on_free_port(
    name: str, make_argv: Callable[[int], list[str]], log_dir: Path, ready_path: str
) -> tuple[Service, int]:
    """Start a server on a free port, retrying if another process grabbed the port first."""
    last: Exception | None = None
    for attempt in range(3):
        port = _free_port()
        log_path = log_dir / f"{name}-{attempt}.log"
        try:
            service = _start(
                name,
                make_argv(port),
                log_path,
                lambda port=port: http_get(f"http://127.0.0.1:{port}{ready_path}", 2)[0] == 200,
            )
            return service, port
        except RuntimeError as exc:
            last = exc
            if "address already in use" not in str(exc).lower():
                break
    pytest.fail(str(last))


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a currently free loopback port."""
    return _free_port


# -- binaries ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def service_binaries() -> dict[str, str]:
    """Paths of prometheus, prometheus-pushgateway and promtool (installing them once if missing)."""

    def found() -> dict[str, str | None]:
        return {name: shutil.which(name) for name in BINARIES}

    paths = found()
    if not all(paths.values()):
        result = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
        paths = found()
        if not all(paths.values()):
            pytest.fail(
                f"missing {[n for n, p in paths.items() if not p]} after {INSTALL_SCRIPT.name} "
                f"(exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )
    return {name: str(path) for name, path in paths.items()}


# -- Prometheus ----------------------------------------------------------------------------
@dataclass
class PrometheusServer:
    url: str
    service: Service

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query through the HTTP API; the result vector."""
        status, body = http_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            raise ValueError(f"query {expr!r} failed: {status} {body[:300]!r}")
        return data["data"]["result"]

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll the query until it returns at least one series (bounded)."""
        return wait_until(lambda: self.query(expr), timeout, 0.5, f"Prometheus series {expr!r}")

    def targets(self) -> list[dict[str, Any]]:
        _status, body = http_get(f"{self.url}/api/v1/targets")
        return json.loads(body)["data"]["activeTargets"]


@pytest.fixture
def prometheus_server(
    service_binaries: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., PrometheusServer]]:
    """Factory: prometheus_server(["127.0.0.1:PORT", ...], scrape_interval="1s") -> a running Prometheus."""
    started: list[Service] = []

    def start(
        scrape_targets: list[str], scrape_interval: str = "1s", job: str = "qlorax"
    ) -> PrometheusServer:
        workdir = tmp_path_factory.mktemp("prometheus")
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [
                {
                    "job_name": job,
                    "scrape_interval": scrape_interval,
                    "scrape_timeout": scrape_interval,
                    "static_configs": [{"targets": list(scrape_targets)}],
                }
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        check = subprocess.run(
            [service_binaries["promtool"], "check", "config", str(config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr

        def argv(port: int) -> list[str]:
            return [
                service_binaries["prometheus"],
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ]

        service, port = _start_on_free_port("prometheus", argv, workdir, "/-/ready")
        started.append(service)
        return PrometheusServer(f"http://127.0.0.1:{port}", service)

    yield start
    for service in started:
        service.stop()


# -- Pushgateway ---------------------------------------------------------------------------
@dataclass
class Pushgateway:
    url: str
    service: Service

    def metrics_text(self) -> str:
        status, body = http_get(f"{self.url}/metrics")
        assert status == 200
        return body.decode()


@pytest.fixture
def pushgateway_server(
    service_binaries: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pushgateway]:
    """A Pushgateway on a free loopback port (in-memory: no persistence file)."""
    workdir = tmp_path_factory.mktemp("pushgateway")

    def argv(port: int) -> list[str]:
        return [
            service_binaries["prometheus-pushgateway"],
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]

    service, port = _start_on_free_port("pushgateway", argv, workdir, "/-/ready")
    yield Pushgateway(f"http://127.0.0.1:{port}", service)
    service.stop()


# -- qlorax serve --------------------------------------------------------------------------
_SERVING = re.compile(
    r"serving metrics=http://(?P<metrics>[^/\s]+)/metrics health=http://(?P<health>[^/\s]+)/health"
)


@dataclass
class QloraxServe:
    service: Service
    metrics_target: str  # host:port, for a scrape config
    health_target: str

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_target}/metrics"

    def get(self, path: str) -> tuple[int, Any]:
        """GET a health endpoint; (status, parsed JSON)."""
        status, body = http_get(f"http://{self.health_target}{path}")
        return status, json.loads(body)

    def stop(self) -> int:
        return self.service.stop()


def qlorax_argv(*args: str) -> list[str]:
    """The qlorax CLI as a subprocess of this interpreter (the venv's)."""
    return [sys.executable, "-c", "from qlorax.cli import main; main()", *args]


@pytest.fixture
def qlorax_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., QloraxServe]]:
    """Factory: qlorax_serve(artifact_dir=..., watch_dir=..., extra_args=[...]) -> a running `qlorax serve`.

    Binds 127.0.0.1 with port 0 for both servers and reads the bound ports from its first line."""
    started: list[Service] = []

    def start(
        artifact_dir: Path | None = None,
        watch_dir: Path | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
    ) -> QloraxServe:
        workdir = tmp_path_factory.mktemp("serve")
        args = [
            "serve",
            "--metrics-port",
            "0",
            "--health-port",
            "0",
            "--artifact-dir",
            str(artifact_dir or workdir / "runs"),
            "--min-free-disk-mb",
            "1",
        ]
        if watch_dir is not None:
            args += ["--watch-dir", str(watch_dir), "--watch-interval", "0.2"]
        args += list(extra_args)
        log_path = workdir / "serve.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        service = _start(
            "qlorax serve",
            qlorax_argv(*args),
            log_path,
            lambda: _SERVING.search(log_path.read_text(errors="replace")) is not None,
            env=env,
        )
        started.append(service)
        match = _SERVING.search(log_path.read_text(errors="replace"))
        assert match is not None
        return QloraxServe(service, match["metrics"], match["health"])

    yield start
    for service in started:
        service.stop()


# -- in-process CLI ------------------------------------------------------------------------
@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run `qlorax ARGS...` in-process through the real entry point (exit codes included)."""
    from qlorax.cli import main

    def run(*args: Any) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["qlorax", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc_info:
            main()
        captured = capsys.readouterr()
        code = exc_info.value.code
        return CliResult(
            code if isinstance(code, int) else (0 if code is None else 1), captured.out, captured.err
        )

    return run


# -- synthetic run directories ---------------------------------------------------------------
def make_run_dir(
    path: Path,
    seed: int = 0,
    environment: str = "native",
    status: str = "complete",
    finished: bool = True,
    duration: float = 21.3,
) -> Path:
    """A small run directory with every file docs/run-directory.md lists and a real manifest."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file(
        {
            "base_model.model.layers.0.q_proj.lora_A.weight": rng.standard_normal((4, 16), dtype=np.float32),
            "base_model.model.layers.0.q_proj.lora_B.weight": rng.standard_normal((16, 4), dtype=np.float32),
        },
        str(path / "adapter_model.safetensors"),
    )
    files = {
        "adapter_config.json": {"base_model_name_or_path": "qlorax/tiny-llama", "r": 4, "peft_type": "LORA"},
        "training_args.json": {"max_steps": 3, "seed": seed},
        "resolved_config.json": {"config_hash": f"{seed:064x}", "training": {"seed": seed}},
        "results.json": {"config_hash": f"{seed:064x}", "seed": seed, "steps": 3, "final_train_loss": 3.1},
        "tokenizer.json": {"version": "1.0", "model": {"type": "BPE"}},
        "tokenizer_config.json": {"model_max_length": 256},
        "env.json": {"environment": environment, "profile": "strict", "threads": 2},
        "training_metadata.json": {
            "status": status,
            "started_at": "2026-11-30T02:30:00Z",
            "finished_at": "2026-11-30T02:30:21Z",
            "duration_seconds": duration,
            "peak_memory_mb": 612.4,
            "tokens_per_second": 5100.0,
            "qlorax_version": "0.1.0",
        },
    }
    for name, content in files.items():
        (path / name).write_text(pretty_json(content))
    (path / "trace.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 7.0 - s}) + "\n" for s in (1, 2, 3))
    )
    (path / "train.log").write_text("step 1 loss 6.0\nstep 2 loss 5.0\nstep 3 loss 4.0\n")
    checkpoint = path / CHECKPOINTS_DIR / "step-00000002"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "optimizer.bin").write_bytes(b"\x00" * 64)
    (path / LOCK).write_text("1234\n")
    if finished:
        write_manifest(path)
    return path


@pytest.fixture
def synthetic_run(tmp_path: Path) -> Callable[..., Path]:
    """Factory: synthetic_run(name="run", **knobs) -> a run directory under tmp_path."""

    def make(name: str = "run", **knobs: Any) -> Path:
        return make_run_dir(tmp_path / name, **knobs)

    return make


@pytest.fixture(autouse=True)
def _forget_registered_secrets() -> Iterator[None]:
    """Registered secrets are process-global: no test sees another's."""
    from qlorax.ops.secrets import clear_registered_secrets

    clear_registered_secrets()
    yield
    clear_registered_secrets()
