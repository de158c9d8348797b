"""Hardening, races: `gc` beside live runs and verifications, a run directory deleted under a
live run, two verifications into one directory, and a full disk (a real tmpfs filled up,
mounted in a user namespace where this user may not mount one: tests/small_disk.py).

The live trains are paused (SIGSTOP) at a known point while the other party acts, so each
race is decided the same way on a fast or a busy machine, and then continued (SIGCONT)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, assert_no_traceback, run_cli
from qlorax.layout import LOCK, MANIFEST, METADATA, checkpoint_dir_name
from small_disk import SmallDisk

CLI = [sys.executable, "-c", "from qlorax.cli import main; main()"]
FOUR_STEPS = ["--set", "training.max_steps=4", "--set", "training.save_steps=2", "--set", "training.eval_steps=4",
              "--set", "training.sample_max_new_tokens=2", "--set", "data.max_length=64"]


def start_train(run_dir: Path, disk: SmallDisk | None = None) -> subprocess.Popen[str]:
    argv = [*CLI, "train", "--config", str(TINY_CONFIG), "--output-dir", str(run_dir), "--threads", "1", *FOUR_STEPS]
    return subprocess.Popen(disk.command(argv) if disk else argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


class PausedTrain:
    """A 4-step `qlorax train` whose training child is stopped (SIGSTOP: alive, its lock held)
    as soon as its step-2 checkpoint exists, until `finish()` continues it (SIGCONT). On a
    SmallDisk, `run_dir` is the path the run writes to and `view` where this process sees it."""

    def __init__(self, run_dir: Path, disk: SmallDisk | None = None):
        self.run_dir = run_dir
        self.view = disk.view / run_dir.relative_to(disk.path) if disk else run_dir
        self.process = start_train(run_dir, disk)
        self.pid: int | None = None
        self.watcher = threading.Thread(target=self._pause_at_checkpoint, daemon=True)
        self.watcher.start()

    def _pause_at_checkpoint(self) -> None:
        checkpoint = self.view / "checkpoints" / checkpoint_dir_name(2)
        deadline = time.monotonic() + 300
        while not checkpoint.is_dir():
            if self.process.poll() is not None or time.monotonic() > deadline:
                return
            time.sleep(0.005)
        self.pid = int((self.view / LOCK).read_text())  # the training child holds the lock
        os.kill(self.pid, signal.SIGSTOP)

    def paused_pid(self) -> int:
        self.watcher.join(timeout=300)
        assert self.pid is not None, self.process.communicate(timeout=60)
        return self.pid

    def finish(self) -> tuple[int, str]:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)
        _, stderr = self.process.communicate(timeout=240)
        return self.process.returncode, stderr


# The module's live trains by role, the small disk, or why there is no small disk ("full").
Trains = dict[str, PausedTrain | SmallDisk | str]


@pytest.fixture(scope="module")
def trains(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trains]:
    """Three 4-step trains started together, each paused at its step-2 checkpoint: one beside
    gc, one whose directory is deleted, one on a 16 MiB tmpfs ("disk": mounted in a user
    namespace where this user may not mount one). Without any way to mount it, "full" is why
    not, and the full-disk test fails with it (the other two still run)."""
    base = tmp_path_factory.mktemp("races")
    started: Trains = {}
    try:
        started["disk"] = SmallDisk(base / "disk", "16m")
    except AssertionError as no_tmpfs:
        started["full"] = str(no_tmpfs)
    try:
        started.update({name: PausedTrain(base / name / "live") for name in ("gc", "lost")})
        if isinstance(disk := started.get("disk"), SmallDisk):
            started["full"] = PausedTrain(disk.path / "run", disk)
        yield started
    finally:
        for train in started.values():
            if isinstance(train, PausedTrain) and train.process.poll() is None:
                if train.pid is not None:
                    os.kill(train.pid, signal.SIGCONT)
                train.process.terminate()
                train.process.communicate(timeout=120)
        if isinstance(disk := started.get("disk"), SmallDisk):
            disk.close()


def dead_pid() -> int:
    """The pid of a process that has exited (a stale lock names one)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_gc_keeps_live_runs_and_everything_inside_a_live_verification(trains: Trains) -> None:
    """`gc --older-than 0s --yes` beside a live train and a live verification: a finished run
    inside the verification (whose lock is held) is kept, a finished run nobody holds is deleted.
    Then with --include-incomplete: the train's directory (unfinished, locked) and the live
    verification are kept, an interrupted run nobody holds is deleted, and a folder that only
    looks like a run (a train.log) is not touched. The train then finishes intact."""
    from qlorax.analysis import verify_run_dir
    from qlorax.rundir import RunLock
    from synthetic_runs import make_run

    train = trains["gc"]
    assert isinstance(train, PausedTrain)
    live, root = train.run_dir, train.run_dir.parent
    old = make_run(root, "old")
    stale = root / "stale"
    (stale / "checkpoints").mkdir(parents=True)
    (stale / "checkpoints" / "config.json").write_text("{}")
    (stale / LOCK).write_text(str(dead_pid()))
    notes = root / "notes"
    notes.mkdir()
    (notes / "train.log").write_text("my own notes\n")
    verification = root / "verification"
    inside = make_run(verification, "run-01")
    (verification / "logs").mkdir()
    verification_lock = RunLock(verification).acquire()  # this test is the live verification

    def gc(*extra: str) -> dict[str, str]:
        collected = run_cli("gc", "--older-than", "0s", "--yes", "--root", str(root), *extra, env={"COLUMNS": "250"})
        assert collected.returncode == 0, collected.stderr
        assert_no_traceback(collected)
        return {line.split("│")[1].strip(): line for line in collected.stdout.splitlines() if line.count("│") > 3}

    try:
        pid = train.paused_pid()
        finished_only = gc()
        incomplete_too = gc("--include-incomplete")
    finally:
        verification_lock.release()
    assert f"keep (locked by live pid {os.getpid()} on verification)" in finished_only["verification/run-01"]
    assert "deleted" in finished_only["old"] and not old.exists()
    assert set(finished_only) == {"old", "verification/run-01"}
    assert f"keep (locked by live pid {pid})" in incomplete_too["live"]
    assert f"keep (locked by live pid {os.getpid()})" in incomplete_too["verification"]
    assert "incomplete verification" in incomplete_too["verification"]
    assert "deleted" in incomplete_too["stale"] and not stale.exists()
    assert (notes / "train.log").is_file() and (inside / MANIFEST).is_file()

    code, stderr = train.finish()
    assert code == 0, stderr
    assert verify_run_dir(live)["intact"]


def test_a_run_whose_directory_is_deleted_fails_in_one_paragraph(trains: Trains) -> None:
    """Someone ignores the lock (`rm -rf`): the run stops at its next step with exit 2 and one
    paragraph, and writes nothing more (the directory is not made again, no manifest)."""
    train = trains["lost"]
    assert isinstance(train, PausedTrain)
    live = train.run_dir
    train.paused_pid()
    shutil.rmtree(live)
    code, stderr = train.finish()
    assert code == 2, stderr
    assert "Traceback" not in stderr
    message = " ".join(stderr.split())
    assert f"the run directory {live} was deleted or replaced while the run was writing into it" in message
    assert not live.exists()


def test_a_second_verification_into_a_locked_directory_is_refused(tmp_path: Path) -> None:
    """The verification directory is locked like a run directory: exit 2 naming it and the live
    holder, before a log or a run is written there."""
    from qlorax.rundir import RunLock

    out = tmp_path / "verify"
    holder = RunLock(out).acquire()  # this test is the first, live verification
    try:
        second = run_cli("verify", "--config", str(TINY_CONFIG), "--runs", "2", "--threads", "1",
                         "--output-dir", str(out), *FOUR_STEPS)
    finally:
        holder.release()
    assert second.returncode == 2
    assert_no_traceback(second)
    message = " ".join(second.stderr.split())
    assert f"output directory {out} is in use by a running qlorax process (pid {os.getpid()})" in message
    assert sorted(p.name for p in out.iterdir()) == []  # no logs/, no run-01/


def test_a_verification_analyses_only_the_runs_it_made(tmp_path: Path) -> None:
    """Both directories hold identical finished runs, but run-01's process failed in this
    verification (say, it found the directory locked by another one): it counts as failed and
    is not read, so the score is 0.5, not 1.0."""
    from qlorax.analysis import analyze_runs, write_reports
    from qlorax.layout import REPORT_CURVES_PLOTTED, REPORT_SCORE, report_get
    from synthetic_runs import make_runs

    runs = make_runs(tmp_path / "verify", ["run-01", "run-02"])
    assert report_get(analyze_runs(runs), REPORT_SCORE) == 1.0  # what the old verify reported

    report = analyze_runs(runs, exit_codes=[2, 0])
    assert report_get(report, REPORT_SCORE) == 0.5
    failed = report["runs"][0]
    assert (failed["status"], failed["exit_code"], failed["deterministic_digest"]) == ("incomplete", 2, None)
    assert "exited with code 2 in this verification" in failed["status_reason"]
    assert any(line.startswith("Run run-01 is incomplete (its training process exited with code 2")
               for line in report["conclusions"])
    assert report["divergence"][0]["note"].startswith("not compared")
    write_reports(report, runs, tmp_path / "verify")
    assert report_get(report, REPORT_CURVES_PLOTTED) == 1  # the failed run's trace is not drawn


def test_disk_full_message_says_what_works_without_a_checkpoint(tmp_path: Path) -> None:
    from qlorax.jobs.train import disk_full_message

    message = disk_full_message(tmp_path / "run")
    assert f"start it again with `qlorax train --output-dir {tmp_path / 'run'}`" in message
    assert "`qlorax resume` has nothing to continue from" in message


def test_full_disk_says_resume_and_resume_then_works(trains: Trains) -> None:
    """The disk fills up after the step-2 checkpoint: the step-4 checkpoint fails with ENOSPC,
    the message says to resume from step 2, and once space is freed `resume` finishes the run."""
    from qlorax.analysis import verify_run_dir

    train, disk = trains["full"], trains.get("disk")
    if isinstance(train, str):
        pytest.fail(train)  # no tmpfs: the promise would go untested, so this fails (never a skip)
    assert isinstance(train, PausedTrain) and isinstance(disk, SmallDisk)
    run_dir = train.run_dir
    train.paused_pid()
    filler = disk.view / "filler"
    filler.write_bytes(bytes(disk.free_bytes() - 512 * 1024))  # less room than one 2 MiB checkpoint
    code, stderr = train.finish()
    assert code == 2, stderr
    assert "Traceback" not in stderr
    message = " ".join(stderr.split())
    assert "the disk is full while writing into" in message
    assert f"continue it from its checkpoint of step 2 with `qlorax resume {run_dir}`" in message
    assert not (train.view / MANIFEST).exists()

    filler.unlink()
    resumed = disk.run_cli("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert verify_run_dir(train.view)["intact"]
    assert json.loads((train.view / METADATA).read_text())["resumed_from_step"] == 2


def test_a_lock_knows_when_its_directory_was_made_again(tmp_path: Path) -> None:
    """The check a live run makes before each write, and a release that never removes the lock
    of whoever made the directory again at the same path."""
    from qlorax.rundir import RunDirectoryLost, RunLock

    run_dir = tmp_path / "run"
    first = RunLock(run_dir).acquire()
    first.check()
    shutil.rmtree(run_dir)
    second = RunLock(run_dir).acquire()
    assert second.intact() and not first.intact()
    with pytest.raises(RunDirectoryLost, match="was deleted or replaced"):
        first.check()
    first.release()
    assert (run_dir / LOCK).read_text() == str(os.getpid()) and second.intact()
    second.release()
    assert not (run_dir / LOCK).exists()
