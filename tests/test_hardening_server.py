"""Hardening, `qlorax serve`: /metrics only on /metrics (404 elsewhere, whatever the path), both
ports on one bounded waitress loop, oversized headers refused at once, and /livez answering
within a second while 200 slow connections are open."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

CLI = [sys.executable, "-c", "from qlorax.cli import main; main()"]


@dataclass
class Served:
    host: str
    metrics_port: int
    health_port: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("serve")
    process = subprocess.Popen(
        [*CLI, "serve", "--metrics-port", "0", "--health-port", "0", "--artifact-dir", str(workdir / "runs"),
         "--min-free-disk-mb", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.search(r"metrics=http://([\d.]+):(\d+)/metrics health=http://[\d.]+:(\d+)/health", line)
        assert found, line + (process.stdout.read() if process.poll() is not None else "")
        threading.Thread(target=process.stdout.read, daemon=True).start()  # a full pipe would block it
        yield Served(found[1], int(found[2]), int(found[3]))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0


def raw_request(host: str, port: int, request: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, whole response) of one raw HTTP/1.0-style exchange (the server closes)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    return int(response.split(b" ", 2)[1]), response


def get(served: Served, port: int, path: bytes, method: bytes = b"GET") -> tuple[int, bytes]:
    return raw_request(served.host, port, method + b" " + path + b" HTTP/1.0\r\nHost: x\r\n\r\n")


def test_metrics_only_on_metrics(served: Served) -> None:
    status, body = get(served, served.metrics_port, b"/metrics")
    assert status == 200 and b"reproducible_training_runs_total" in body
    assert b"\r\nServer: qlorax" in body  # the same waitress server as the health port
    for path in (b"/", b"/anything", b"/../../etc/passwd", b"/%2e%2e/%2e%2e/etc/passwd", b"/metrics/",
                 b"/metricsx", b"/favicon.ico", b"/metrics/../health", b"/%ff%fe"):
        status, body = get(served, served.metrics_port, path)
        assert status == 404, path
        assert b"reproducible_training" not in body
    status, body = get(served, served.metrics_port, b"/\xff\xfe\xfd")  # not UTF-8: waitress refuses it
    assert status in (400, 404) and b"reproducible_training" not in body
    assert get(served, served.metrics_port, b"/metrics", b"POST")[0] == 404
    assert get(served, served.metrics_port, b"/metrics?name[]=reproducibility_score")[0] == 200


def test_health_port_serves_health_only(served: Served) -> None:
    assert get(served, served.health_port, b"/livez")[0] == 200
    assert get(served, served.health_port, b"/metrics")[0] == 404
    assert get(served, served.health_port, b"/\xff\xfe")[0] in (400, 404)


@pytest.mark.parametrize(("port_name", "path"), [("health_port", b"/livez"), ("metrics_port", b"/metrics")])
def test_an_unsupported_http_version_gets_505(served: Served, port_name: str, path: bytes) -> None:
    """HTTP/9.9 (or 2.0 in plain text) is not served as if it were HTTP/1.x, on either port."""
    port = getattr(served, port_name)
    for version in (b"HTTP/9.9", b"HTTP/2.0"):
        status, body = raw_request(served.host, port, b"GET " + path + b" " + version + b"\r\nHost: x\r\n\r\n")
        assert status == 505, (version, body[:200])
        assert b"reproducible_training" not in body and b"alive" not in body
    assert get(served, port, path)[0] == 200  # HTTP/1.0 still served


@pytest.mark.parametrize("port_name", ["health_port", "metrics_port"])
def test_ten_thousand_headers_are_refused_at_once(served: Served, port_name: str) -> None:
    """Answered 431 (or closed, when the server hangs up while the client still sends) at once."""
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    started = time.monotonic()
    try:
        status, _ = raw_request(served.host, getattr(served, port_name), b"GET /livez HTTP/1.1\r\nHost: x\r\n" +
                                headers + b"\r\n")
    except (ConnectionResetError, BrokenPipeError):
        status = 431
    assert status == 431
    assert time.monotonic() - started < 2.0
    with socket.create_connection((served.host, getattr(served, port_name)), timeout=5) as sock:
        sock.sendall(b"GET /livez HTTP/1.0\r\n" + b"X-Big: " + b"v" * 20_000)  # headers over 16 KiB, unfinished
        assert sock.recv(64).startswith(b"HTTP/1.0 431 ")


def test_livez_answers_within_a_second_beside_200_slow_connections(served: Served) -> None:
    slow: list[socket.socket] = []
    try:
        for index in range(200):
            sock = socket.create_connection((served.host, served.health_port if index % 2 else served.metrics_port),
                                            timeout=5)
            if index % 4 == 0:
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # a request never finished
            slow.append(sock)  # the others: connected, silent (half-open from the server's view)
        time.sleep(0.2)
        for _ in range(3):
            started = time.monotonic()
            status, body = get(served, served.health_port, b"/livez")
            elapsed = time.monotonic() - started
            assert status == 200 and b'"alive"' in body
            assert elapsed < 1.0, f"/livez took {elapsed:.2f}s beside 200 slow connections"
        assert get(served, served.metrics_port, b"/metrics")[0] == 200
    finally:
        for sock in slow:
            sock.close()


def test_server_settings_are_bounded() -> None:
    """Statically: the bounds the live tests rely on (limits, timeouts, header size)."""
    from qlorax.ops.health import SERVER_SETTINGS

    assert 200 < SERVER_SETTINGS["connection_limit"] < 1000
    assert SERVER_SETTINGS["channel_timeout"] <= 30 and SERVER_SETTINGS["cleanup_interval"] <= 5
    assert SERVER_SETTINGS["max_request_header_size"] <= 64 * 1024
    assert SERVER_SETTINGS["asyncore_use_poll"] is True
