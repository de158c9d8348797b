"""CLI commands (registered by qlorax.cli). Must not import torch at module level."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
