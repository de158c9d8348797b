"""Errors a user can act on, each with the exit code the CLI returns for it.

Exit codes (documented in docs/commands.md):
  0  success
  1  a check failed: verification score below 1.0, a failing gate, a manifest mismatch
  2  bad input: config, data, model path, output directory, disk
  3  resources unavailable (admission timed out)
  130 / 143  interrupted by SIGINT / SIGTERM (a checkpoint was written, or the run never started)

A message is one paragraph. A long upstream message (transformers, tokenizers, the hub) is
condensed into it; the whole text travels as `detail`, printed with `--verbose`
(QLORAX_VERBOSE=1) and written to the run's train.log when a run directory exists.
"""

from __future__ import annotations

from qlorax import settings

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RESOURCES = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class QloraxError(Exception):
    """An error with a one-paragraph message for the user and an exit code; never a traceback."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None, detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        if exit_code is not None:
            self.exit_code = exit_code

    def render(self) -> str:
        """The paragraph to print: the message, plus the upstream detail under --verbose (or a
        pointer to it)."""
        if not self.detail:
            return self.message
        if settings.verbose():
            return f"{self.message}\ndetail: {self.detail}"
        return f"{self.message} (the full upstream message: `qlorax --verbose ...`; a run keeps it in its train.log)"




def condense(text: str, limit: int = 200) -> str:
    """An upstream message as one line of at most about `limit` characters (whole words)."""
    line = " ".join(str(text).split())
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0] + " …"


class ConfigError(QloraxError):
    """The config file is unreadable or invalid."""


class DataError(QloraxError):
    """A data file is missing or malformed (the message names file:line)."""


class ModelError(QloraxError):
    """The base model cannot be found or loaded."""


class OutputError(QloraxError):
    """The output directory is locked, finished, unwritable, or the disk is full."""


class ResourceError(QloraxError):
    """Not enough memory or CPU became free before the admission timeout."""

    exit_code = EXIT_RESOURCES
