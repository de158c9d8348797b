"""Errors a user can act on, each with the exit code the CLI returns for it.

Exit codes (documented in the README):
  0  success
  1  a check failed: verification score below 1.0, a failing gate, a manifest mismatch
  2  bad input: config, data, model path, output directory, disk
  3  resources unavailable (admission timed out)
  130 / 143  interrupted by SIGINT / SIGTERM after writing a checkpoint
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RESOURCES = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class QloraxError(Exception):
    """An error with a one-paragraph message for the user and an exit code; never a traceback."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code


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
