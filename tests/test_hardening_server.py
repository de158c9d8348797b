"""Hardening, `qlorax serve`: /metrics only on /metrics (404 elsewhere, whatever the path), both
ports on one bounded waitress loop, oversized headers refused at once (before the request ends),
and /livez answered while 200 slow connections are open. No timing thresholds: each promise is
shown by the order of events (an answer to a request never finished, an answer while the slow
connections are still open)."""

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

import psutil
import pytest

CLI = [sys.executable, "-c", "from qlorax.cli import main; main()"]


@dataclass
class Served:
    host: str
    metrics_port: int
    health_port: int
    pid: int


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
        yield Served(found[1], int(found[2]), int(found[3]), process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0


def raw_request(host: str, port: int, request: bytes, timeout: float = 60.0) -> tuple[int, bytes]:
    """(status, whole response) of one raw HTTP/1.0-style exchange (the server closes)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    return int(response.split(b" ", 2)[1]), response


def get(served: Served, port: int, path: bytes, method: bytes = b"GET", timeout: float = 60.0) -> tuple[int, bytes]:
    return raw_request(served.host, port, method + b" " + path + b" HTTP/1.0\r\nHost: x\r\n\r\n", timeout)


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


@dataclass
class Outcome:
    """How one exchange ended: the HTTP status that arrived (None when none did), and whether the
    server reset the connection while this client was still sending its request."""

    status: int | None
    reset_while_sending: bool
    response: bytes


def exchange(host: str, port: int, request: bytes, timeout: float = 120.0) -> Outcome:
    """Send `request`, then read what comes back until the server closes. A reset while sending
    is recorded, not raised, and whatever the server answered before it is still read."""
    reset_while_sending = False
    chunks = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (ConnectionResetError, BrokenPipeError):
            reset_while_sending = True
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    response = b"".join(chunks)
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else None
    return Outcome(status, reset_while_sending, response)


@pytest.mark.parametrize("port_name", ["health_port", "metrics_port"])
def test_ten_thousand_headers_are_refused_at_once(served: Served, port_name: str) -> None:
    """10,000 headers (~110 KiB, over the 16 KiB limit): the server answers 431 and closes. A reset
    while the client is still sending is also accepted, and it is not counted as a 431: the
    server stops reading at its limit and closes with the rest of the request unread, which TCP
    may turn into a reset that overtakes the answer. Either way nothing is served. That the
    answer is a 431, sent as soon as the limit is passed (not after the request ends or times
    out), is shown by the request that never ends."""
    port = getattr(served, port_name)
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    outcome = exchange(served.host, port, b"GET /livez HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert outcome.status == 431 or (outcome.status is None and outcome.reset_while_sending), outcome
    assert b"alive" not in outcome.response and b"reproducible_training" not in outcome.response
    with socket.create_connection((served.host, port), timeout=120) as sock:
        # Headers over 16 KiB, never finished: only the limit can make the server answer now.
        sock.sendall(b"GET /livez HTTP/1.0\r\n" + b"X-Big: " + b"v" * 20_000)
        assert sock.recv(64).startswith(b"HTTP/1.0 431 ")
    assert get(served, port, b"/livez" if port_name == "health_port" else b"/metrics")[0] == 200


def server_connections(served: Served) -> int:
    """The server's established TCP connections on its two ports."""
    ports = {served.metrics_port, served.health_port}
    return sum(1 for c in psutil.Process(served.pid).net_connections(kind="tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port in ports)


def test_livez_answers_beside_200_slow_connections(served: Served) -> None:
    """200 connections held open on both ports: 100 silent, 100 sending an unfinished request one
    byte at a time (so the server's idle time-out never closes them). Once the server holds them
    all, /livez is answered three times, and the trickling connections are still open afterwards:
    the answers did not wait for them to end. A server whose slow clients held its threads would
    never answer (the socket's bound is 120 s, a failure, not a measurement)."""
    slow: list[socket.socket] = []
    trickling: list[socket.socket] = []
    stop = threading.Event()
    refused: list[OSError] = []  # a trickling send the server no longer took (it closed or reset)

    def trickle() -> None:
        while not stop.wait(0.5):
            for sock in trickling:
                try:
                    sock.sendall(b"v")
                except OSError as error:
                    refused.append(error)

    trickler = threading.Thread(target=trickle, daemon=True)
    try:
        for index in range(200):
            sock = socket.create_connection((served.host, served.health_port if index % 2 else served.metrics_port),
                                            timeout=120)
            if index % 4 < 2:
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # a request never finished
                trickling.append(sock)
            slow.append(sock)  # the others: connected, silent (half-open from the server's view)
        trickler.start()
        deadline = time.monotonic() + 120
        while server_connections(served) < 200:  # the server has accepted every one of them
            assert time.monotonic() < deadline, f"the server holds {server_connections(served)} of 200 connections"
            time.sleep(0.05)
        for _ in range(3):
            status, body = get(served, served.health_port, b"/livez", timeout=120)
            assert status == 200 and b'"alive"' in body
        assert get(served, served.metrics_port, b"/metrics", timeout=120)[0] == 200
        stop.set()
        trickler.join(timeout=60)
        assert not trickler.is_alive() and refused == []
        for sock in trickling:  # still open: no answer, no close, no reset from the server
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        stop.set()
        for sock in slow:
            sock.close()


def test_server_settings_are_bounded() -> None:
    """Statically: the bounds the live tests rely on (limits, timeouts, header size)."""
    from qlorax.ops.health import SERVER_SETTINGS

    assert 200 < SERVER_SETTINGS["connection_limit"] < 1000
    assert SERVER_SETTINGS["channel_timeout"] <= 30 and SERVER_SETTINGS["cleanup_interval"] <= 5
    assert SERVER_SETTINGS["max_request_header_size"] <= 64 * 1024
    assert SERVER_SETTINGS["asyncore_use_poll"] is True
