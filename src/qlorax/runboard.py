"""Runs followed live: `verify` (its training runs) and `probe` (its processors) say which run is
queued, which is running (its phase and step, read from the run's train.log) and how each ended.

On a terminal (stderr is a tty) a rich live table on stderr; otherwise one plain line on stdout
when a run starts and one when it ends. The runs write their own output to log files; this
module only reads (train.log is informational, flushed per line) and never writes a file.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorax.phases import duration, on_terminal

STEP = re.compile(r"\bstep (\d+)/(\d+)")
PHASE = re.compile(r"\bphase (\w+):")
POLL_SECONDS = 0.5
TAIL_BYTES = 16384


@dataclass
class BoardRow:
    """One run: its name, its layout (threads, workers, processor), and what to follow."""

    name: str
    layout: str
    log: Path | None = None  # a train.log to read the phase and step from
    started_marker: Path | None = None  # for runs the board does not start itself: a file
    done_marker: Path | None = None  # written (after the board opened) when it starts / ends
    status: str = "queued"
    step: str = "-"
    began: float | None = None
    seconds: float = 0.0


def tail_progress(log: Path | None) -> tuple[str | None, str | None]:
    """(phase, `k/n` step) from the end of a train.log; None for what it does not say yet."""
    if log is None:
        return None, None
    try:
        with open(log, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - TAIL_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None, None
    phases, steps = PHASE.findall(text), STEP.findall(text)
    return (phases[-1] if phases else None), (f"{steps[-1][0]}/{steps[-1][1]}" if steps else None)


class RunBoard:
    """`with RunBoard(title, rows):` follows the rows until the block ends. The code running the
    runs calls `started(name)` and `ended(name, exit_code)`, or rows carry marker files."""

    def __init__(self, title: str, rows: list[BoardRow], live: bool | None = None) -> None:
        self.title = title
        self.rows = {row.name: row for row in rows}
        self.live_mode = on_terminal() if live is None else live
        self.opened = time.time()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.poller: threading.Thread | None = None
        self.live: Any = None

    def __enter__(self) -> RunBoard:
        if self.live_mode:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(get_renderable=self.table, console=Console(stderr=True), refresh_per_second=4,
                             transient=False)
            self.live.start()
        self.poller = threading.Thread(target=self._poll, name="qlorax-runboard", daemon=True)
        self.poller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        if self.poller is not None:
            self.poller.join(timeout=5)
        self.refresh()
        if self.live is not None:
            self.live.stop()

    def started(self, name: str) -> None:
        with self.lock:
            row = self.rows[name]
            row.status, row.began = "starting", time.perf_counter()
            self._say(f"{row.name} started ({row.layout})")

    def ended(self, name: str, exit_code: int) -> None:
        with self.lock:
            row = self.rows[name]
            row.seconds = time.perf_counter() - row.began if row.began is not None else 0.0
            row.status = "finished" if exit_code == 0 else f"failed (exit {exit_code})"
            _, step = tail_progress(row.log)
            row.step = step or row.step
            self._say(f"{row.name} {row.status} in {duration(row.seconds)}"
                      + (f", step {row.step}" if row.step != "-" else ""))

    def refresh(self) -> None:
        """Read every running row's train.log; follow marker files."""
        for row in list(self.rows.values()):
            if row.status == "queued" and self._marked(row.started_marker):
                self.started(row.name)
            if row.began is None or row.status.startswith(("finished", "failed")):
                continue
            if self._marked(row.done_marker):
                self.ended(row.name, 0)
                continue
            phase, step = tail_progress(row.log)
            with self.lock:
                row.status = phase or row.status
                row.step = step or row.step
                row.seconds = time.perf_counter() - row.began

    def table(self) -> Any:
        from rich.table import Table

        table = Table(title=self.title, title_justify="left")
        for column in ("run", "threads / workers / processor", "step", "status", "time"):
            table.add_column(column)
        with self.lock:
            for row in self.rows.values():
                colour = "green" if row.status == "finished" else "red" if row.status.startswith("failed") else ""
                status = f"[{colour}]{row.status}[/]" if colour else row.status
                table.add_row(row.name, row.layout, row.step, status, duration(row.seconds) if row.began else "")
        return table

    def _marked(self, marker: Path | None) -> bool:
        try:
            return marker is not None and marker.stat().st_mtime >= self.opened - 1
        except OSError:
            return False

    def _say(self, line: str) -> None:
        if not self.live_mode:
            print(line, flush=True)

    def _poll(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            self.refresh()
