"""The two ways a publish fails besides bad input (exit 2): refused (exit 1) or unreachable (exit 3)."""

from __future__ import annotations

from qlorax.errors import EXIT_CHECK_FAILED, EXIT_RESOURCES, QloraxError


class PublishRefused(QloraxError):
    """The run is not fit to publish: its manifest does not check, or the report does not prove it."""

    exit_code = EXIT_CHECK_FAILED


class PublishError(QloraxError):
    """The Hub or the registry could not be reached, or refused the upload."""

    exit_code = EXIT_RESOURCES
