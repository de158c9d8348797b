"""The child process: started by the launcher with the determinism pins already set.

Reads one job as JSON on stdin and dispatches it by kind to the module that runs it. A
new kind (generate, export, eval) is one module under `qlorax.jobs` with a
`run(payload) -> exit code` function, plus one entry in `JOB_KINDS`. Every user-facing
failure becomes one message on stderr and a documented exit code, never a traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any, NoReturn

from qlorax import interrupts
from qlorax.errors import EXIT_BAD_INPUT, QloraxError

JOB_KINDS: dict[str, str] = {
    "train": "qlorax.jobs.train",
    "env": "qlorax.jobs.env",
    "prepare": "qlorax.jobs.prepare",
    "generate": "qlorax.jobs.generate",
    "eval": "qlorax.jobs.evaluate",
    "export": "qlorax.jobs.export",
    "probe": "qlorax.jobs.probe",
}


def dispatch_job(kind: str) -> Any:
    """The `run(payload) -> int` function of a job kind."""
    if kind not in JOB_KINDS:
        raise QloraxError(f"unknown job kind {kind!r}; expected one of {', '.join(JOB_KINDS)}")
    return importlib.import_module(JOB_KINDS[kind]).run


# Optional numeric libraries that log or warn when imported (bitsandbytes reports the native
# backends it did not find, gguf its readers); their loggers keep only errors.
QUIET_LOGGERS = ("bitsandbytes", "gguf", "torchao")


def quiet_libraries() -> None:
    """Library progress bars, import-time chatter and deprecation notices are noise in a
    run's output; errors still reach stderr (only warnings and below are dropped)."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # plain tqdm bars (e.g. GGUF dequantizing); read at import
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning, module=rf"{name}(\..*)?$")


def main() -> int:
    # First: a signal from here to the first training step stops the job at once, with one line.
    interrupts.install(interrupts.raise_interrupted)
    try:
        quiet_libraries()
        text = sys.stdin.read()
        if not text.strip():
            print("error: no job on stdin (the qlorax launcher starts this process)", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
        payload = json.loads(text)
        run = dispatch_job(str(payload.get("kind")))
        return run(payload)
    except interrupts.JobInterrupted as stop:
        print(f"interrupted by {interrupts.signal_name(stop.signum)} before the job started its work",
              file=sys.stderr, flush=True)
        return stop.exit_code
    except QloraxError as exc:
        from qlorax.ops.secrets import scrub_text

        print(f"error: {scrub_text(exc.render())}", file=sys.stderr, flush=True)
        return exc.exit_code


def exit_without_teardown(code: int) -> NoReturn:
    """End a worker whose job has returned, skipping the interpreter's teardown. gloo's threads
    can still be releasing a finished all_gather's tensors then; that needs the GIL, which a
    finalizing interpreter answers by ending the thread, and libstdc++ then aborts the process
    (exit -6 after a run that had finished: seen about once in 30 two-worker exits on a busy
    machine; torch's own fix, PR 179291, was abandoned). Every file the job wrote is closed by
    now; logging and stdio are flushed here."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the reader went away: nothing left to deliver
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())  # an unexpected exception still prints its traceback (exit 1)
