"""SIGINT and SIGTERM at any moment: exit 130 / 143 with one line, never a traceback.

Three places own a signal, one after the other:

* the CLI process (`exit_on_signal`): outside a child's life it stops at once, saying so;
* the launcher, while a child runs: it forwards the signal to the child and returns the
  child's code (a child killed by a signal counts as 128 + its number);
* the child: before the first training step a signal raises `JobInterrupted` (nothing to
  checkpoint: `qlorax resume` starts the directory from step 0 (its config is recorded), or keeps the
  checkpoints it had); from the first step on, the training loop finishes the step, writes a
  checkpoint and exits 130 / 143.

Pure standard library: the CLI installs this before it imports anything heavy.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from qlorax.errors import EXIT_SIGINT, EXIT_SIGTERM

HANDLED = (signal.SIGINT, signal.SIGTERM)
_EXIT_CODES = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}


def exit_code_for(signum: int) -> int:
    """130 for SIGINT, 143 for SIGTERM, 128 + N for any other signal (the shell's convention)."""
    return _EXIT_CODES.get(signum, 128 + int(signum))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def code_of_child(returncode: int) -> int:
    """A child's exit status as the shell reports it: killed by signal N (returncode -N) is 128 + N."""
    return exit_code_for(-returncode) if returncode < 0 else returncode


class JobInterrupted(BaseException):
    """A signal arrived before there was anything to checkpoint. A BaseException, so that a
    library's `except Exception` cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum
        self.exit_code = exit_code_for(signum)


def raise_interrupted(signum: int, _frame: Any) -> None:
    """Handler for a job's set-up phase: stop now."""
    raise JobInterrupted(signum)


# The first signal the CLI process received: no child starts after it, even if the SystemExit
# below was swallowed (an exception raised while a finalizer runs is only printed).
requested: int | None = None


def exit_on_signal(signum: int, _frame: Any) -> None:
    """Handler for the CLI process while no child runs: one line, then exit 130 / 143."""
    global requested
    requested = signum
    print(f"interrupted by {signal_name(signum)}; stopping (exit {exit_code_for(signum)}). A run that had "
          "started continues with `qlorax resume DIR`.", file=sys.stderr, flush=True)
    raise SystemExit(exit_code_for(signum))


def install(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """Set `handler` for SIGINT and SIGTERM (main thread only); returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in HANDLED}


def restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
