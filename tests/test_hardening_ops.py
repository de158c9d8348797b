"""Hardening, operations: credentials in any URL are redacted from every message (the
Pushgateway warning included) while still used for basic auth; the default `verify --jobs`
never oversubscribes the cores."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_cli
from qlorax.ops.secrets import REDACTED, scrub_text

PASSWORD = "s3cretPushPass"
TOKEN_USER = "ghp_tokenAsTheUserName42"


@pytest.mark.parametrize(("text", "hidden"), [
    (f"push to http://user:{PASSWORD}@127.0.0.1:9091/ failed", PASSWORD),
    (f"remote https://{TOKEN_USER}@github.com/org/repo.git", TOKEN_USER),
    (f"mlflow at https://admin:{PASSWORD}@mlflow.example.org:5000/api and more", PASSWORD),
    (f"endpoint=hf://bot:{PASSWORD}@hub.example.org/models", PASSWORD),
])
def test_credentials_in_any_url_are_redacted(text: str, hidden: str) -> None:
    scrubbed = scrub_text(text)
    assert hidden not in scrubbed and REDACTED in scrubbed


def test_urls_without_credentials_are_left_alone() -> None:
    text = "see https://github.com/org/repo and mailto:me@example.org, http://host/path?a=b@c"
    assert scrub_text(text).startswith("see https://github.com/org/repo and mailto:me@example.org")


def test_pushgateway_warning_never_shows_the_password(tmp_path: Path) -> None:
    """A failed push with credentials in the URL: the warning names the URL without them."""
    from synthetic_runs import make_run

    run = make_run(tmp_path, "run")
    result = run_cli("metrics", "record", str(run), "--pushgateway", f"http://pusher:{PASSWORD}@127.0.0.1:9/")
    assert result.returncode == 2
    assert PASSWORD not in result.stdout + result.stderr
    assert "http://127.0.0.1:9/" in result.stderr


@pytest.fixture
def basic_auth_gateway() -> Iterator[tuple[str, list[str]]]:
    """A tiny HTTP server standing in for a Pushgateway: records each Authorization header."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802 - the http.server convention
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://pusher:{PASSWORD}@127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_in_the_pushgateway_url_are_sent_as_basic_auth(basic_auth_gateway: tuple[str, list[str]]
                                                                   ) -> None:
    from qlorax.ops.metrics import TrainingMetrics

    url, seen = basic_auth_gateway
    TrainingMetrics().push(url, job="qlorax-test")
    assert seen == ["Basic " + base64.b64encode(f"pusher:{PASSWORD}".encode()).decode()]
    assert PASSWORD not in scrub_text(f"pushed to {url}")


@pytest.mark.parametrize(("threads", "cores", "jobs"), [
    ([1, 2], 2, 1), ([1], 2, 2), ([1, 2], 16, 8), ([2], 2, 1), ([4], 2, 1), ([1, 2, 4], 8, 2), ([3], 16, 5),
])
def test_default_verify_jobs_never_oversubscribe(threads: list[int], cores: int, jobs: int) -> None:
    from qlorax.verify import default_jobs

    assert default_jobs(threads, cores) == jobs


def test_default_verify_jobs_fill_the_cores_without_oversubscribing() -> None:
    """The property itself, on the code's answers (not the table above): every combination of
    thread counts, worker counts and cores gets at least one job, never more threads than cores
    once there is more than one job, and as many jobs as fit."""
    from qlorax import settings
    from qlorax.verify import default_jobs

    for cores in range(1, 33):
        for threads in ([1], [2], [1, 2], [3], [1, 2, 4], [8], [64]):
            for workers in (None, [1], [2], [1, 3]):
                jobs = default_jobs(threads, cores, worker_counts=workers)
                per_run = max(threads) * max(workers or [1])
                assert jobs >= 1
                assert jobs == 1 or jobs * per_run <= cores, (threads, workers, cores, jobs)
                assert (jobs + 1) * per_run > cores, (threads, workers, cores, jobs)  # no core left for one more
    assert default_jobs([1, 2]) == default_jobs([1, 2], settings.usable_cores())  # the machine's usable cores
