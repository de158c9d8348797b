"""A run says what it is doing (issue 25, part 2): every phase, in order, on a terminal (a real
pseudo-terminal: rich's live display) and in plain output (one line per phase); the phases and
their durations in train.log; and the display never changes a bit of the run."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, assert_no_traceback, run_cli
from qlorax.runboard import BoardRow, RunBoard, tail_progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")
STEPS = "training.max_steps=3"
# What a user sees, in this order: the parent checking its inputs, the child importing torch,
# the model loading (or converting, in a fresh home), the tokenization, the bar from step 0,
# the evaluation, the samples and the manifest being written.
ON_SCREEN = ["inputs:", "importing torch", "qlorax/tiny-llama", "tokenizing", "step 0/3", "step 3/3",
             "evaluation", "samples", "manifest", "finished"]
PLAIN_PHASES = ["inputs", "start", "model", "data", "adapter", "training", "evaluation", "artifacts", "samples",
                "manifest"]


def run_on_terminal(args: list[str], timeout: float = 600) -> tuple[str, float, int]:
    """`qlorax ARGS` with stdout and stderr on a pseudo-terminal (120x40); returns what the
    terminal received, seconds from the spawn to its first byte, and the exit code."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    env.pop("NO_COLOR", None)
    spawned = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", "from qlorax.cli import main; main()", *args],
                               stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    received, first_byte = bytearray(), None
    deadline = spawned + timeout
    try:
        while time.perf_counter() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every holder of the terminal closed it
                break
            if not chunk:
                break
            if first_byte is None:
                first_byte = time.perf_counter() - spawned
            received += chunk
    finally:
        os.close(leader)
        code = process.wait(timeout=60)
    return received.decode("utf-8", errors="replace"), first_byte if first_byte is not None else float("inf"), code


def positions(text: str, markers: list[str]) -> list[int]:
    return [text.find(marker) for marker in markers]


def adapter_sha256(run_dir: Path) -> str:
    return json.loads((run_dir / "artifact_summary.json").read_text())["files"]["adapter_model.safetensors"]["sha256"]


@pytest.fixture(scope="module")
def terminal_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, float, int, Path]:
    """One tiny training on a pseudo-terminal: (raw screen, text without escapes, seconds to
    the first byte, exit code, run directory)."""
    out = tmp_path_factory.mktemp("progress") / "tty"
    screen, first_byte, code = run_on_terminal(["train", "-c", str(TINY_CONFIG), "--set", STEPS,
                                                "--threads", "1", "--output-dir", str(out)])
    return screen, ANSI.sub("", screen), first_byte, code, out


def test_on_a_terminal_every_phase_shows_live_in_order(terminal_run: tuple[str, str, float, int, Path]) -> None:
    screen, text, first_byte, code, _ = terminal_run
    assert code == 0, text[-3000:]
    assert "Traceback" not in text
    found = positions(text, ON_SCREEN)
    print(f"first byte on the terminal {first_byte:.2f} s after the spawn; markers at {found}")
    assert all(at >= 0 for at in found), dict(zip(ON_SCREEN, found, strict=True))
    assert found == sorted(found), dict(zip(ON_SCREEN, found, strict=True))
    # Something is on the screen at once: the parent's first phase line, before the training
    # child has even imported torch (the issue asks for 2 s: printed above, not asserted, as a
    # loaded machine may take longer than that to start an interpreter).
    assert text.lstrip().startswith("• inputs:"), text[:200]
    assert "\x1b[" in screen  # a live display, redrawn in place
    assert "tokens/s" in text and "ETA" in text and "parameters" in text and "examples/s" in text


def test_plain_output_is_one_line_per_phase_in_order_and_the_bits_do_not_change(
        tmp_path: Path, terminal_run: tuple[str, str, float, int, Path]) -> None:
    out = tmp_path / "plain"
    result = run_cli("train", "-c", str(TINY_CONFIG), "--set", STEPS, "--threads", "1", "--output-dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_no_traceback(result)
    lines = result.stdout.splitlines()
    named = [line.split(":", 1)[0] for line in lines if line.split(":", 1)[0] in PLAIN_PHASES]
    assert named == PLAIN_PHASES, result.stdout
    assert "\x1b[" not in result.stdout + result.stderr
    step_line = next(i for i, line in enumerate(lines) if line.startswith("step 3/3"))
    assert step_line < next(i for i, line in enumerate(lines) if line.startswith("evaluation:"))
    log = (out / "train.log").read_text()
    for phase in PLAIN_PHASES[1:-1]:  # the manifest's duration cannot be in the file it hashes
        assert re.search(rf"phase {phase} done in \d+\.\d+ s", log), (phase, log)
    assert "phase manifest:" in log and "examples/s" in log and "parameters" in log
    # The display is not the computation: the same run on a terminal has the same bits.
    tty = terminal_run[4]
    assert terminal_run[3] == 0
    assert adapter_sha256(tty) == adapter_sha256(out)
    digests = [json.loads((run / "artifact_summary.json").read_text())["deterministic_digest"] for run in (out, tty)]
    assert digests[0] == digests[1]


def test_run_board_follows_runs_in_plain_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "run-01" / "train.log"
    log.parent.mkdir()
    log.write_text("t phase model: loading x\nt phase training: step 0/4\nt step 1/4 loss=1\nt step 2/4 loss=1\n")
    assert tail_progress(log) == ("training", "2/4")
    assert tail_progress(tmp_path / "missing") == (None, None)
    rows = [BoardRow("run-01", "1 / 1 / native", log=log), BoardRow("run-02", "2 / 1 / native")]
    with RunBoard("verify", rows, live=False) as board:
        board.started("run-01")
        board.refresh()
        assert board.rows["run-01"].status == "training" and board.rows["run-01"].step == "2/4"
        assert board.rows["run-02"].status == "queued"
        board.ended("run-01", 0)
        board.started("run-02")
        board.ended("run-02", 1)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "run-01 started (1 / 1 / native)"
    assert out[1].startswith("run-01 finished in ") and out[1].endswith("step 2/4")
    assert out[2] == "run-02 started (2 / 1 / native)" and out[3].startswith("run-02 failed (exit 1) in ")


def test_run_board_follows_marker_files_and_renders_a_table(tmp_path: Path) -> None:
    from rich.console import Console

    started, done = tmp_path / "native.log", tmp_path / "native.json"
    board = RunBoard("probe", [BoardRow("native", "1 / 1 / native", started_marker=started, done_marker=done)],
                     live=False)
    board.refresh()
    assert board.rows["native"].status == "queued"
    started.write_text("")
    board.refresh()
    assert board.rows["native"].status == "starting"
    done.write_text("{}")
    board.refresh()
    assert board.rows["native"].status == "finished"
    console = Console(record=True, width=100)
    console.print(board.table())
    rendered = console.export_text()
    assert "native" in rendered and "finished" in rendered
