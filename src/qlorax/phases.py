"""What a training process is doing, said as it happens: one phase at a time (loading the
model, tokenizing, training, evaluation, samples, artifacts, the manifest), each with how far
along it is.

On a terminal (stderr is a tty) a rich live display on stderr: one row per phase, a bar
where the phase knows its length (training from step 0: step, loss, tokens/s, ETA), and the
phase's duration once it ends. Otherwise plain lines on stdout: one when a phase starts, one
every PLAIN_STEP_EVERY steps. Every phase's start and duration also go to train.log (an
informational file: timings never go into a deterministic one).

Display only: nothing here touches a tensor, a seed or a file the manifest pins, and nothing
imports torch (the parent commands use `announce` too).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

PLAIN_STEP_EVERY = 10
LogWriter = Callable[[str], None]


def on_terminal() -> bool:
    """The live display is for a person watching: stderr is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """1.2 s, 3m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def announce(what: str) -> None:
    """A phase line from a parent command (before any child speaks): `resolving inputs`, ..."""
    if on_terminal():
        from rich.console import Console

        Console(stderr=True).print(f"[cyan]•[/] {what}", highlight=False, markup=True)
    else:
        print(what, flush=True)


class Phases:
    """One training process's phases. `begin` ends the current phase (logging its duration) and
    starts the next; `detail` adds facts to it; `advance` says k of n; `step` is the training
    loop's progress callback; `counter` gives a k/n callback for a short task inside a phase
    (an evaluation between steps). A silent instance (no display, no log) does nothing."""

    def __init__(self, display: PlainDisplay | LiveDisplay | None = None) -> None:
        self.display = display
        self.log: LogWriter | None = None
        self.pending: list[str] = []
        self.name: str | None = None
        self.what = ""
        self.started = 0.0
        self.first_step = 0

    @classmethod
    def for_this_process(cls) -> Phases:
        """The live display on a terminal, plain lines otherwise."""
        return cls(LiveDisplay() if on_terminal() else PlainDisplay())

    # ------------------------------------------------------------------ train.log

    def attach_log(self, write: LogWriter) -> None:
        """train.log is open: what was said before it opened goes there first (a silent
        instance, shared by every caller that shows nothing, logs nothing either)."""
        if self.display is None:
            return
        self.log = write
        for line in self.pending:
            write(line)
        self.pending = []

    def detach_log(self) -> None:
        """train.log is about to close (before the manifest hashes it)."""
        self.log = None

    def _log(self, line: str) -> None:
        if self.log is not None:
            self.log(line)
        elif self.display is not None:
            self.pending.append(line)

    # ------------------------------------------------------------------ phases

    def begin(self, name: str, what: str, total: int | None = None, done: int = 0) -> None:
        self.end()
        self.name, self.what, self.started, self.first_step = name, what, time.perf_counter(), done
        self._log(f"phase {name}: {what}")
        if self.display is not None:
            self.display.begin(name, what, total, done)

    def detail(self, facts: str) -> None:
        """Facts learnt during the phase (a model's size, examples/s): shown and logged."""
        if self.name is None:
            return
        self.what = f"{self.what} ({facts})"
        self._log(f"phase {self.name}: {facts}")
        if self.display is not None:
            self.display.detail(self.name, self.what)

    def advance(self, done: int, total: int) -> None:
        if self.display is not None and self.name is not None:
            self.display.advance(self.name, done, total, f"{done}/{total}")

    def step(self, step: int, total: int, loss: float, rate: float) -> None:
        """The loop's ProgressCallback: after every optimizer step."""
        if self.display is None or self.name is None:
            return
        elapsed = time.perf_counter() - self.started
        done = step - self.first_step
        eta = duration(elapsed / done * (total - step)) if done > 0 else "?"
        info = f"step {step}/{total}  loss {loss:.4f}  {rate:.0f} tokens/s  ETA {eta}"
        self.display.step(self.name, step, total, info)

    def counter(self, what: str) -> Callable[[int, int], None]:
        """A batch k/n callback for a task inside the current phase; logs its duration at n/n."""
        started = time.perf_counter()

        def update(done: int, total: int) -> None:
            if self.display is not None and self.name is not None:
                self.display.aside(self.name, f"{what}: batch {done}/{total}", done == total)
            if done == total:
                self._log(f"{what}: {total} batches in {time.perf_counter() - started:.2f} s")

        return update

    def end(self) -> None:
        """The current phase is over: its duration to train.log and the display."""
        if self.name is None:
            return
        seconds = time.perf_counter() - self.started
        self._log(f"phase {self.name} done in {seconds:.2f} s")
        if self.display is not None:
            self.display.end(self.name, seconds)
        self.name = None

    def close(self) -> None:
        self.end()
        if self.display is not None:
            self.display.close()


SILENT = Phases()


class PlainDisplay:
    """Not a terminal: one line when a phase starts and one every PLAIN_STEP_EVERY steps (and
    the last), on stdout, flushed (a pipe or a log file sees them as they happen)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def begin(self, name: str, what: str, total: int | None, done: int) -> None:
        del total, done
        self._print(f"{name}: {what}")

    def detail(self, name: str, what: str) -> None:
        del name, what

    def advance(self, name: str, done: int, total: int, info: str) -> None:
        del name, done, total, info

    def step(self, name: str, step: int, total: int, info: str) -> None:
        del name
        if step % PLAIN_STEP_EVERY == 0 or step == total:
            self._print(info)

    def aside(self, name: str, info: str, finished: bool) -> None:
        del name, info, finished

    def end(self, name: str, seconds: float) -> None:
        del name, seconds

    def close(self) -> None:
        pass


class LiveDisplay:
    """A terminal: rich's live progress on stderr, one row per phase (kept when it ends, with
    its duration), a bar for a phase that knows its length."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Column

        # The phase's name keeps its width; a long info is cut at the end of its row instead.
        self.progress = Progress(TextColumn("{task.fields[mark]}"),
                                 TextColumn("[bold]{task.description:<10}", table_column=Column(min_width=10)),
                                 BarColumn(bar_width=24),
                                 TextColumn("{task.fields[info]}",
                                            table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                                 TimeElapsedColumn(table_column=Column(min_width=7, no_wrap=True)),
                                 console=Console(stderr=True), refresh_per_second=8, transient=False)
        self.tasks: dict[str, Any] = {}
        self.infos: dict[str, str] = {}
        self.started = False

    def begin(self, name: str, what: str, total: int | None, done: int) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        self.infos[name] = what
        self.tasks[name] = self.progress.add_task(name, total=total, completed=done, mark="[cyan]•[/]", info=what)
        self.progress.refresh()

    def detail(self, name: str, what: str) -> None:
        self.infos[name] = what
        self.progress.update(self.tasks[name], info=what)

    def advance(self, name: str, done: int, total: int, info: str) -> None:
        self.progress.update(self.tasks[name], completed=done, total=total, info=f"{self.infos[name]}  {info}")

    def step(self, name: str, step: int, total: int, info: str) -> None:
        self.infos[name] = info
        self.progress.update(self.tasks[name], completed=step, total=total, info=info)

    def aside(self, name: str, info: str, finished: bool) -> None:
        self.progress.update(self.tasks[name], info=self.infos[name] if finished else f"{self.infos[name]}  {info}")

    def end(self, name: str, seconds: float) -> None:
        task = self.tasks[name]
        if next(t for t in self.progress.tasks if t.id == task).total is None:  # a bar for a phase that had none
            self.progress.update(task, total=1, completed=1)
        self.progress.update(task, mark="[green]✓[/]", info=f"{self.infos[name]}  [dim]{duration(seconds)}[/]")
        self.progress.stop_task(task)
        self.progress.refresh()

    def close(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False
