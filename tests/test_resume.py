"""Crash safety: SIGKILL/SIGTERM mid-run, resume, and bit-identical results."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import BackgroundCli, assert_no_traceback, run_cli
from qlorax.artifacts import load_manifest, read_json
from qlorax.checkpoint import list_checkpoints

# Gradient accumulation on, checkpoints every 2 steps, all mid-epoch (72 micro-batches per epoch).
RESUME_SETTINGS = [
    "--set", "training.max_steps=8", "--set", "training.batch_size=4",
    "--set", "training.gradient_accumulation_steps=2", "--set", "training.save_steps=2",
    "--set", "training.save_total_limit=3", "--set", "training.eval_steps=3",
    "--set", "training.warmup_steps=2", "--set", "training.trace_every=1", "--set", "data.max_length=96",
]


def det_digests(run_dir: Path) -> dict[str, str]:
    manifest = load_manifest(run_dir)
    assert manifest is not None, f"{run_dir} is not finished"
    return {k: v["sha256"] for k, v in manifest["files"].items() if v["kind"] == "deterministic"}


def start_training(run_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from qlorax.cli import main; main()", "train", "--output-dir", str(run_dir),
         "--threads", "1", *RESUME_SETTINGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_checkpoint(run_dir: Path, step: int, process: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    target = run_dir / "checkpoints" / f"step-{step:08d}"
    while time.monotonic() < deadline:
        if target.is_dir():
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended before checkpoint {step}: {process.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"checkpoint {step} did not appear")


INTERRUPTIONS = {"killed-2": (2, signal.SIGKILL), "killed-6": (6, signal.SIGKILL), "term-2": (2, signal.SIGTERM)}


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four runs of the resume settings started side by side (1 thread each; separate pinned
    processes, so no bit depends on the others):
    - `uninterrupted`: the reference bits of every resume below. While it trains, a second `train`
      into its directory is started (and refused); once it finished, a third (refused: no --force);
    - `killed-2`, `killed-6`: SIGKILLed after their step-2 and step-6 checkpoints; `killed-6` is
      copied as `corrupt` for the corrupted-checkpoint test (one kill, trained once);
    - `term-2`: SIGTERM after its step-2 checkpoint (its exit code and stderr are kept)."""
    root = tmp_path_factory.mktemp("resume")
    dirs = {name: root / name for name in ("uninterrupted", *INTERRUPTIONS)}
    processes = {name: start_training(path) for name, path in dirs.items()}
    second: BackgroundCli | None = None
    try:
        pending, deadline = dict(INTERRUPTIONS), time.monotonic() + 240
        while pending or second is None:
            if second is None and (dirs["uninterrupted"] / ".qlorax.lock").is_file():
                second = BackgroundCli("train", "--output-dir", str(dirs["uninterrupted"]), *RESUME_SETTINGS)
            for name, (step, signum) in list(pending.items()):
                if (dirs[name] / "checkpoints" / f"step-{step:08d}").is_dir():
                    os.killpg(processes[name].pid, signum)
                    del pending[name]
            for name in [*pending, *(["uninterrupted"] if second is None else [])]:
                if processes[name].poll() is not None:
                    raise AssertionError(f"{name} ended too early: {processes[name].stderr.read()}")
            assert time.monotonic() < deadline, f"no checkpoint (or lock) appeared in time: {sorted(pending)}"
            time.sleep(0.02)
        finished = {name: process.communicate(timeout=300) for name, process in processes.items()}
    finally:
        for process in processes.values():  # only after a failure: leave nothing running
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    assert processes["uninterrupted"].returncode == 0, finished["uninterrupted"][1]
    assert second is not None
    shutil.copytree(dirs["killed-6"], root / "corrupt", symlinks=True)
    again = run_cli("train", "--output-dir", str(dirs["uninterrupted"]), *RESUME_SETTINGS)
    return {**dirs, "corrupt": root / "corrupt", "second": second.result(), "again": again,
            "term-2 exit": (processes["term-2"].returncode, finished["term-2"][1])}


@pytest.fixture(scope="module")
def uninterrupted(resume_runs: dict[str, Any]) -> dict[str, str]:
    return det_digests(resume_runs["uninterrupted"])


@pytest.mark.parametrize("kill_after_checkpoint", [2, 6])
def test_sigkill_then_resume_is_bit_identical(resume_runs: dict[str, Any], uninterrupted: dict[str, str],
                                              kill_after_checkpoint: int) -> None:
    run_dir = resume_runs[f"killed-{kill_after_checkpoint}"]
    assert load_manifest(run_dir) is None, "a killed run must not look finished"
    check = run_cli("check", str(run_dir))
    assert check.returncode == 1
    resumed = run_cli("resume", str(run_dir), "--threads", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from checkpoint" in resumed.stdout + resumed.stderr
    assert det_digests(run_dir) == uninterrupted
    assert read_json(run_dir / "training_metadata.json")["resumed_from_step"] >= kill_after_checkpoint


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tmp_path: Path,
                                                                      uninterrupted: dict[str, str]) -> None:
    """The parent records the config before the child starts: SIGKILLed before any checkpoint
    (here, while the child still loads), the run is resumed by its directory alone, from step 0."""
    run_dir = tmp_path / "killed-0"
    process = start_training(run_dir)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "config.json").is_file():
        assert process.poll() is None and time.monotonic() < deadline, "the config was not recorded in time"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert not list_checkpoints(run_dir) and load_manifest(run_dir) is None
    resumed = run_cli("resume", str(run_dir), "--threads", "1")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert det_digests(run_dir) == uninterrupted


def test_corrupt_newest_checkpoint_falls_back_to_previous(resume_runs: dict[str, Any],
                                                          uninterrupted: dict[str, str]) -> None:
    run_dir = resume_runs["corrupt"]  # a copy of killed-6, made before its resume
    assert load_manifest(run_dir) is None
    newest = list_checkpoints(run_dir)[-1]
    state = newest / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-5] ^= 0xFF
    state.write_bytes(bytes(data))
    resumed = run_cli("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    output = resumed.stdout + resumed.stderr
    assert f"checkpoint {newest.name} is corrupt or partial" in output
    assert det_digests(run_dir) == uninterrupted


def test_sigterm_writes_checkpoint_and_exits_143(resume_runs: dict[str, Any], uninterrupted: dict[str, str]) -> None:
    run_dir = resume_runs["term-2"]
    returncode, stderr = resume_runs["term-2 exit"]
    assert returncode == 143, stderr
    assert f"qlorax resume {run_dir}" in stderr
    assert "Traceback" not in stderr
    assert load_manifest(run_dir) is None
    resumed = run_cli("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert det_digests(run_dir) == uninterrupted


def test_second_train_on_a_live_directory_is_refused(resume_runs: dict[str, Any]) -> None:
    second = resume_runs["second"]  # started while the uninterrupted run was training
    assert second.returncode == 2
    assert_no_traceback(second)
    assert "in use by a running qlorax process" in second.stderr
    assert load_manifest(resume_runs["uninterrupted"]) is not None  # the first one finished
    again = resume_runs["again"]  # after it finished
    assert again.returncode == 2 and "--force" in again.stderr


def test_stale_lock_from_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / ".qlorax.lock").write_text(dead.stdout.strip())
    result = run_cli("train", "--output-dir", str(run_dir), *RESUME_SETTINGS, "--set", "training.max_steps=2")
    assert result.returncode == 0, result.stderr
    assert "stale lock" in result.stderr and dead.stdout.strip() in result.stderr
    assert not (run_dir / ".qlorax.lock").exists()
