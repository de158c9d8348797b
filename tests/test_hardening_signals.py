"""Hardening, signals: SIGINT/SIGTERM at any moment end the command with 130/143 and one line,
leaving a directory that `resume` either continues or reports as never started; `resume` of a
finished run is exit 0 with nothing to do (exit 1 when it fails its manifest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import TINY_CONFIG, assert_no_traceback, run_cli
from qlorax.artifacts import load_manifest
from qlorax.layout import LOCK

CLI = [sys.executable, "-c", "from qlorax.cli import main; main()"]
TWO_STEPS = ["--set", "training.max_steps=2", "--set", "training.warmup_steps=1"]


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_children(process: subprocess.Popen[str], count: int, timeout: float = 120) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(process.pid).children()
        if len(children) >= count:
            return children
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{count} child process(es) did not start")


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def wait_for_lock_holder(run_dir: Path, process: subprocess.Popen[str], timeout: float = 300) -> int:
    """The pid of the training child of `process` once it holds `run_dir`'s lock: the child takes
    it first, before it imports torch and loads the model, so a signal sent now lands while the
    child loads, on a fast machine or a busy one."""
    deadline = time.monotonic() + timeout
    lock = run_dir / LOCK
    while time.monotonic() < deadline:
        text = lock.read_text() if lock.is_file() else ""
        if text.strip().isdigit() and int(text) in {c.pid for c in psutil.Process(process.pid).children()}:
            return int(text)
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    raise AssertionError(f"no child of {process.pid} took {lock}")


def test_sigterm_while_the_child_loads_is_143_and_resumes_from_step_0(tmp_path: Path) -> None:
    """SIGTERM to the launcher once its child holds the run's lock (and so is still importing
    torch, loading the model): 143, one line; `train` may reuse the directory, and `resume`
    starts it from step 0 (the parent recorded its config before the child started)."""
    from qlorax.rundir import prepare_output_dir

    run_dir = tmp_path / "run"
    process = start("train", "--config", str(TINY_CONFIG), "--output-dir", str(run_dir), "--threads", "1",
                    *TWO_STEPS)
    wait_for_lock_holder(run_dir, process)
    os.kill(process.pid, signal.SIGTERM)  # the launcher only: it forwards to the child
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "interrupted by SIGTERM before the first training step" in one_line(stderr) and "Traceback" not in stderr
    assert load_manifest(run_dir) is None

    prepare_output_dir(run_dir, resume=False, force=False)  # a new `train` there is allowed
    resumed = run_cli("resume", str(run_dir))  # the parent recorded the config: resume starts at step 0
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_no_traceback(resumed)
    assert load_manifest(run_dir) is not None


def test_resume_of_a_finished_run_has_nothing_to_do(tmp_path: Path) -> None:
    """Pods and auto_recovery.sh call resume again after a run finished."""
    from synthetic_runs import flip_byte, make_run

    run_dir = make_run(tmp_path, "run")
    again = run_cli("resume", str(run_dir))
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr
    flip_byte(run_dir / "results.json")
    broken = run_cli("resume", str(run_dir), env={"COLUMNS": "200"})
    assert broken.returncode == 1
    assert_no_traceback(broken)
    assert "fails its manifest" in broken.stderr and "altered: results.json" in broken.stderr


def test_sigint_before_the_child_starts_is_one_line_and_130(tmp_path: Path) -> None:
    """The parent is waiting for admission (memory it will never get): Ctrl-C stops it at once."""
    run_dir = tmp_path / "run"
    process = start("train", "--output-dir", str(run_dir), "--min-memory-gb", "1000000", "--resource-timeout", "5")
    deadline = time.monotonic() + 60
    stderr_start = ""
    while "waiting for resources" not in stderr_start and time.monotonic() < deadline:
        stderr_start += process.stderr.readline()
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted by SIGINT" in one_line(stderr)
    assert not run_dir.exists()


def test_sigterm_to_verify_reaches_every_child(tmp_path: Path) -> None:
    out = tmp_path / "verify"
    process = start("verify", "--config", str(TINY_CONFIG), "--runs", "3", "--jobs", "2", "--threads", "1",
                    "--output-dir", str(out), *TWO_STEPS)
    children = wait_for_children(process, 2)
    time.sleep(0.5)
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "interrupted (exit 143)" in one_line(stderr)
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    assert not (out / "reproducibility_analysis_report.json").exists()


def test_exit_codes_of_signals_and_children() -> None:
    from qlorax.interrupts import code_of_child, exit_code_for

    assert exit_code_for(signal.SIGINT) == 130 and exit_code_for(signal.SIGTERM) == 143
    assert code_of_child(-signal.SIGTERM) == 143 and code_of_child(-signal.SIGKILL) == 137
    assert code_of_child(2) == 2 and code_of_child(0) == 0


def test_no_child_starts_after_the_cli_was_asked_to_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even if the CLI's SystemExit were swallowed, the launcher starts nothing afterwards."""
    from qlorax import interrupts
    from qlorax.launcher import launch_job

    monkeypatch.setattr(interrupts, "requested", signal.SIGTERM)
    assert launch_job("env", {}, "strict", 1) == 143


def test_sigterm_after_the_last_step_finishes_the_run_and_still_exits_143(tmp_path: Path) -> None:
    """The signal lands while the results are written: the run completes (manifest), the
    command says so in one line with 143, and `resume` then has nothing to do."""
    run_dir = tmp_path / "run"
    process = start("train", "--config", str(TINY_CONFIG), "--output-dir", str(run_dir), "--threads", "1",
                    *TWO_STEPS, "--set", "training.sample_max_new_tokens=4", "--set", "data.max_length=64")
    log = run_dir / "train.log"
    deadline = time.monotonic() + 240
    while not (log.is_file() and "step 2/2" in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr
    assert "after the last step; the run finished and is complete" in one_line(stderr)
    assert load_manifest(run_dir) is not None
    resumed = run_cli("resume", str(run_dir))
    assert resumed.returncode == 0 and "nothing to do" in resumed.stderr
