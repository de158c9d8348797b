"""The `qlorax` command line: parse, call one function, render, return an exit code.

No module imported here at load time may import torch: commands that do not train
(analyze, gates, check, audit, serve, config) must start fast.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from typer import TyperException

from qlorax import __version__
from qlorax.commands import analysis as analysis_commands
from qlorax.commands import deploy as deploy_commands
from qlorax.commands import ops as ops_commands
from qlorax.errors import QloraxError

app = typer.Typer(
    name="qlorax",
    help="Reproducibility-first LoRA fine-tuning: bit-identical runs, proven.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)



@app.callback()
def _root() -> None:
    """Reproducibility-first LoRA fine-tuning: bit-identical runs, proven."""


for _module in (analysis_commands, ops_commands, deploy_commands):
    _module.register(app)


@app.command()
def version() -> None:
    """Print the qlorax version."""
    print(__version__)


def main() -> None:
    """Console-script entry point: user errors become one paragraph and an exit code."""
    try:
        app(standalone_mode=False)
    except QloraxError as exc:
        console.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[bold red]aborted[/]")
        sys.exit(130)
    except TyperException as exc:  # usage errors: unknown option, missing argument
        if hasattr(exc, "show"):
            exc.show()
        else:
            console.print(f"[bold red]error:[/] {exc}")
        sys.exit(getattr(exc, "exit_code", 2) or 2)
    sys.exit(0)
