"""Crash safety: SIGKILL/SIGTERM mid-run, resume, and bit-identical results."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_no_traceback, run_cli
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


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The module's one uninterrupted run (the reference bits of every resume below). While it
    trains, a second `train` into its directory is refused; once it finished, a third is refused
    for want of --force."""
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    first = start_training(run_dir)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / ".qlorax.lock").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run_cli("train", "--output-dir", str(run_dir), *RESUME_SETTINGS)
    finally:
        _, first_stderr = first.communicate(timeout=300)
    assert first.returncode == 0, first_stderr
    again = run_cli("train", "--output-dir", str(run_dir), *RESUME_SETTINGS)
    return {"run_dir": run_dir, "second": second, "again": again}


@pytest.fixture(scope="module")
def uninterrupted(live_run: dict[str, object]) -> dict[str, str]:
    return det_digests(live_run["run_dir"])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def killed_after_6(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One run SIGKILLed after its step-6 checkpoint, copied once: a plain resume continues the
    first copy, the other has its newest checkpoint corrupted first (the same kill, trained once)."""
    root = tmp_path_factory.mktemp("killed-6")
    run_dir = root / "run"
    process = start_training(run_dir)
    wait_for_checkpoint(run_dir, 6, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    copy = root / "copy"
    shutil.copytree(run_dir, copy, symlinks=True)
    return run_dir, copy


@pytest.mark.parametrize("kill_after_checkpoint", [2, 6])
def test_sigkill_then_resume_is_bit_identical(tmp_path: Path, uninterrupted: dict[str, str],
                                              kill_after_checkpoint: int,
                                              request: pytest.FixtureRequest) -> None:
    if kill_after_checkpoint == 6:
        run_dir = request.getfixturevalue("killed_after_6")[0]
    else:
        run_dir = tmp_path / "run"
        process = start_training(run_dir)
        wait_for_checkpoint(run_dir, kill_after_checkpoint, process)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert load_manifest(run_dir) is None, "a killed run must not look finished"
    check = run_cli("check", str(run_dir))
    assert check.returncode == 1
    resumed = run_cli("resume", str(run_dir), "--threads", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from checkpoint" in resumed.stdout + resumed.stderr
    assert det_digests(run_dir) == uninterrupted
    assert read_json(run_dir / "training_metadata.json")["resumed_from_step"] >= kill_after_checkpoint


def test_corrupt_newest_checkpoint_falls_back_to_previous(uninterrupted: dict[str, str],
                                                          killed_after_6: tuple[Path, Path]) -> None:
    run_dir = killed_after_6[1]
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


def test_sigterm_writes_checkpoint_and_exits_143(tmp_path: Path, uninterrupted: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    process = start_training(run_dir)
    wait_for_checkpoint(run_dir, 2, process)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert f"qlorax resume {run_dir}" in stderr
    assert "Traceback" not in stderr
    assert load_manifest(run_dir) is None
    resumed = run_cli("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert det_digests(run_dir) == uninterrupted


def test_second_train_on_a_live_directory_is_refused(live_run: dict[str, object]) -> None:
    second = live_run["second"]  # started while the module's uninterrupted run was training
    assert isinstance(second, subprocess.CompletedProcess)
    assert second.returncode == 2
    assert_no_traceback(second)
    assert "in use by a running qlorax process" in second.stderr
    assert load_manifest(live_run["run_dir"]) is not None  # type: ignore[arg-type]  # the first one finished
    again = live_run["again"]  # after it finished
    assert isinstance(again, subprocess.CompletedProcess)
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
