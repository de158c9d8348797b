"""CLI command `gc`: delete finished run and verification directories nobody needs any more.

Parses the age, calls the use case `qlorax.usecases.gc` (which finds, checks the locks and
deletes) and renders its table and summary. A dry run unless `--yes`. Must not import torch:
`gc` runs from cron and from scripts/auto_recovery.sh, where start-up time and memory matter.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from qlorax.commands.units import format_age, format_size, parse_duration
from qlorax.errors import EXIT_CHECK_FAILED


def _dirs(count: int) -> str:
    return "directory" if count == 1 else "directories"


def gc(
    older_than: str = typer.Option(
        ..., "--older-than", help="Age such as 36h, 7d or 2w (units s, m, h, d, w).", show_default=False
    ),
    root: Path = typer.Option(Path("runs"), "--root", help="Directory to clean (links are never followed)."),
    yes: bool = typer.Option(False, "--yes", help="Really delete; without it gc only lists (a dry run)."),
    include_incomplete: bool = typer.Option(
        False, "--include-incomplete", help="Also unfinished runs and verifications (no manifest or report yet) "
        "that no live process holds: interrupted or failed ones."),
) -> None:
    """Delete finished run and verification directories older than an age (dry run without --yes)."""
    from qlorax.usecases.gc import collect

    max_age = parse_duration(older_than, "--older-than", unit_required=True)
    out = Console(soft_wrap=False)
    if not root.exists():
        out.print(f"Nothing to collect: {root} does not exist.")
        return
    result = collect(root, max_age, delete=yes, include_incomplete=include_incomplete)
    young = result.young
    if not result.actions:
        out.print(f"Nothing older than {older_than} under {root} ({young} newer {_dirs(young)} kept).")
        return
    table = Table(title=f"qlorax gc: {root} (older than {older_than})")
    table.add_column("directory", overflow="fold")
    table.add_column("kind")
    table.add_column("age", justify="right")
    table.add_column("size", justify="right")
    table.add_column("action", overflow="fold")
    for candidate, action in result.actions:
        table.add_row(candidate.path.relative_to(result.root).as_posix(), candidate.kind,
                      format_age(result.now - candidate.newest_mtime), format_size(candidate.size), action)
    out.print(table)
    if yes:
        deleted = len(result.deletable) - result.failures
        out.print(f"Deleted {deleted} {_dirs(deleted)}, freed {format_size(result.freed)}; "
                  f"kept {result.held} locked and {young} newer.")
    else:
        total = sum(c.size for c in result.deletable)
        out.print(
            f"Dry run: nothing was deleted. Re-run with --yes to delete {len(result.deletable)} "
            f"{_dirs(len(result.deletable))} ({format_size(total)}); "
            f"{result.held} locked and {young} newer would be kept."
        )
    if result.failures:
        raise typer.Exit(EXIT_CHECK_FAILED)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("gc")(gc)
