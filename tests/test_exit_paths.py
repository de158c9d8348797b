"""Exit paths the README and docs/commands.md promise, each run through the real CLI: a missing
tool or extra (3), a Hub or MLflow server that cannot be reached (3), a refused token (2), a
signal to `verify` or `resume` (130/143). Each ends in one paragraph (one line for a signal),
without a traceback."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import TINY_CONFIG, assert_no_traceback, run_cli
from hub_standin import HubStandIn
from qlorax.artifacts import check_run_dir, load_manifest, read_json
from qlorax.layout import LOCK, METADATA, REPORT_JSON
from synthetic_runs import make_run

CLI = [sys.executable, "-c", "from qlorax.cli import main; main()"]
TWO_STEPS = ["--config", str(TINY_CONFIG), "--threads", "1", "--set", "training.max_steps=2",
             "--set", "training.sample_max_new_tokens=2"]


def assert_one_paragraph(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The error is one paragraph on stderr (no blank line, a few lines at most), naming each
    fragment, without a traceback; returns it on one line."""
    assert_no_traceback(result)
    text = result.stderr.strip()
    assert text and "\n\n" not in text and len(text.splitlines()) <= 8, result.stderr
    message = " ".join(text.split())
    for fragment in fragments:
        assert fragment in message, result.stderr
    return message


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_git_data_source_without_git_is_exit_3(tmp_path: Path) -> None:
    """`git` is not on PATH: the parent says so before a child starts or a file is written."""
    bare = tmp_path / "bin"
    bare.mkdir()  # a PATH with no git (qlorax starts its children by absolute path)
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: git+file://{tmp_path}/repo.git@{'0' * 40}#data.jsonl\n")
    result = run_cli("train", "--config", str(config), "--output-dir", str(tmp_path / "run"), env={"PATH": str(bare)})
    assert result.returncode == 3, result.stdout + result.stderr
    assert_one_paragraph(result, "the `git` command is not installed")
    assert not (tmp_path / "run" / "artifact_summary.json").exists()


def without_mlflow(tmp_path: Path) -> dict[str, str]:
    """An environment in which mlflow is not installed, as Python sees it: a sitecustomize sets
    sys.modules["mlflow"] = None, so find_spec finds nothing and `import mlflow` fails (the
    interpreter's standard way to block a module; nothing in the venv changes)."""
    hook = tmp_path / "no-mlflow"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text('import sys\n\nsys.modules["mlflow"] = None\n')
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)}


def test_mlflow_uri_without_the_mlflow_extra_is_exit_3_before_training(tmp_path: Path) -> None:
    env = without_mlflow(tmp_path)
    hidden = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('mlflow'))"],
                            capture_output=True, text=True, env={**os.environ, **env}, check=True)
    assert hidden.stdout.strip() == "None"  # the stand-in works: mlflow is not there for that process
    run = tmp_path / "run"
    result = run_cli("train", *TWO_STEPS, "--output-dir", str(run), "--mlflow-uri",
                     f"http://127.0.0.1:{closed_port()}", env=env)
    assert result.returncode == 3, result.stdout + result.stderr
    assert_one_paragraph(result, "--mlflow-uri needs the mlflow extra", "qlorax[mlflow]")
    assert not (run / "trace.jsonl").exists() and load_manifest(run) is None  # before any training


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    """A finished run (synthetic, intact) to publish with --allow-unverified: the publish paths
    below fail at the server, after the run's checks."""
    return make_run(tmp_path, "run")


def test_publish_to_an_unreachable_hub_is_exit_3(finished_run: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("hf_" + secrets.token_hex(20) + "\n")
    token.chmod(0o600)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    result = run_cli("publish", str(finished_run), "--repo-id", "tester/tiny", "--token-file", str(token),
                     "--endpoint", endpoint, "--allow-unverified",
                     env={"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 3, result.stdout + result.stderr
    assert_one_paragraph(result, f"cannot reach the Hub at {endpoint}")


def test_publish_to_an_unreachable_mlflow_is_exit_3(finished_run: Path) -> None:
    """mlflow's client alone retried a refused connection with back-off for about 4 minutes
    (measured); qlorax bounds its retries (qlorax.tracking.RETRY_DEFAULTS: ~7 s of back-off)
    unless the user set mlflow's own, so this finishes with no setting at all."""
    uri = f"http://127.0.0.1:{closed_port()}"
    result = run_cli("publish", str(finished_run), "--to", "mlflow", "--mlflow-uri", uri, "--allow-unverified",
                     timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    assert_one_paragraph(result, f"MLflow at {uri}", "Connection refused")


def test_a_token_the_hub_refuses_is_exit_2(finished_run: Path, tmp_path: Path) -> None:
    """The Hub stand-in knows another token: it answers 401, which is the user's input to fix."""
    hub = HubStandIn("hf_" + secrets.token_hex(20)).start()
    try:
        token = tmp_path / "token"
        wrong = "hf_" + secrets.token_hex(20)
        token.write_text(wrong + "\n")
        token.chmod(0o600)
        result = run_cli("publish", str(finished_run), "--repo-id", "tester/tiny", "--token-file", str(token),
                         "--endpoint", hub.url, "--allow-unverified",
                         env={"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")})
    finally:
        hub.stop()
    assert result.returncode == 2, result.stdout + result.stderr
    message = assert_one_paragraph(result, "the Hub refused the publish to tester/tiny (HTTP 401)")
    assert wrong not in message + result.stdout
    assert hub.requests and not any(authorized for *_, authorized in hub.requests)  # it reached the server
    assert hub.repos == {}  # and nothing was created there


def lock_pid(run_dir: Path, process: subprocess.Popen[str], other_than: int | None = None) -> int:
    """Wait until a training child of `process` holds `run_dir`'s lock (it writes its pid there
    as soon as it starts, before torch loads); its pid."""
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, process.communicate(timeout=60)
        assert time.monotonic() < deadline, f"no training child of {process.pid} took {run_dir / LOCK}"
        text = (run_dir / LOCK).read_text() if (run_dir / LOCK).is_file() else ""
        if text.strip().isdigit() and int(text) != other_than:
            pid = int(text)
            if pid in {child.pid for child in psutil.Process(process.pid).children(recursive=True)}:
                return pid
        time.sleep(0.01)


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_sigint_to_verify_is_130_in_one_line_and_no_queued_run_starts(tmp_path: Path) -> None:
    """SIGINT to `verify --runs 2 --jobs 1` while run-01's child loads: 130, one line; the signal
    reaches the child (its run is marked interrupted) and run-02, queued, never starts."""
    out = tmp_path / "verify"
    process = start("verify", *TWO_STEPS, "--runs", "2", "--jobs", "1", "--output-dir", str(out))
    try:
        lock_pid(out / "run-01", process)
        os.kill(process.pid, signal.SIGINT)  # the launcher only: it forwards to its children
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    line = one_line(stderr)
    assert f"verification in {out} interrupted (exit 130)" in line and "no report was written" in line, line
    assert "Traceback" not in stderr and not (out / REPORT_JSON).exists()
    assert read_json(out / "run-01" / METADATA)["status"] == "interrupted"
    # run-02 never started: no child took its directory (its log may be opened, but stays empty).
    assert not (out / "run-02" / LOCK).exists() and not (out / "run-02" / METADATA).exists()
    log = out / "logs" / "run-02.log"
    assert not log.exists() or log.read_text() == ""


def test_a_signal_during_resume_is_its_exit_code_and_the_run_still_resumes(tmp_path: Path) -> None:
    """A run stopped while its child loads (SIGTERM, 143) is resumed; SIGINT to that `resume`
    while its child loads is 130 in one line; a second `resume` then finishes the run intact."""
    run = tmp_path / "run"
    train = start("train", *TWO_STEPS, "--output-dir", str(run))
    first = lock_pid(run, train)
    os.kill(train.pid, signal.SIGTERM)
    _, stderr = train.communicate(timeout=300)
    assert train.returncode == 143, stderr

    resume = start("resume", str(run), "--threads", "1")
    try:
        lock_pid(run, resume, other_than=first)
        os.kill(resume.pid, signal.SIGINT)
        _, stderr = resume.communicate(timeout=300)
    finally:
        if resume.poll() is None:
            os.killpg(resume.pid, signal.SIGKILL)
            resume.communicate(timeout=60)
    assert resume.returncode == 130, stderr
    assert "interrupted" in one_line(stderr) and "Traceback" not in stderr
    assert load_manifest(run) is None

    again = run_cli("resume", str(run), "--threads", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert_no_traceback(again)
    assert check_run_dir(run).intact
    assert read_json(run / "results.json")["steps"] == 2
