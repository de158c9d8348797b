"""The `qlorax` command line: the app, its command modules, and the one exit rule.

Commands live in `qlorax.commands.*` (one module per group), each a top-level function
that `register(app)` adds to the app; each parses, calls one use case, renders, and ends
with `raise typer.Exit(code)`. `main` turns user errors
(QloraxError) into one paragraph and their documented exit code, never a traceback.

No module imported here at load time may import torch: commands that do not train
(analyze, gates, check, audit, serve, config) must start fast.
"""

from __future__ import annotations

import os
import sys

from qlorax import interrupts, settings

if os.path.basename(sys.argv[0] if sys.argv else "") == "qlorax":
    # Run as the console script: take SIGINT/SIGTERM before the ~1 s of imports below, so that
    # a signal at any moment is one line and exit 130/143 (main() installs the same otherwise).
    interrupts.install(interrupts.exit_on_signal)

import typer  # noqa: E402
from rich.console import Console
from rich.markup import escape
from typer import TyperException

from qlorax import __version__
from qlorax.commands import analysis as analysis_commands
from qlorax.commands import config as config_commands
from qlorax.commands import gc as gc_commands
from qlorax.commands import inference as inference_commands
from qlorax.commands import ops as ops_commands
from qlorax.commands import probe as probe_commands
from qlorax.commands import publish as publish_commands
from qlorax.commands import training as training_commands
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
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Print the full upstream message of an "
                                       "error (transformers, tokenizers, the hub) after its one-line summary.")
          ) -> None:
    """Reproducibility-first LoRA fine-tuning: bit-identical runs, proven."""
    if verbose:
        settings.set_verbose()  # the training child inherits it


@app.command()
def version() -> None:
    """Print the qlorax version."""
    print(__version__)


for _module in (training_commands, inference_commands, analysis_commands, config_commands, ops_commands,
                gc_commands, publish_commands, probe_commands):
    _module.register(app)


def main() -> None:
    """Console-script entry point. With standalone_mode=False typer *returns* the code of a
    `typer.Exit` (the one way commands end with a code); everything else maps here."""
    interrupts.install(interrupts.exit_on_signal)  # SIGINT/SIGTERM: one line, exit 130/143
    try:
        returned = app(standalone_mode=False)
    except QloraxError as exc:
        from qlorax.ops.secrets import scrub_text

        console.print(f"[bold red]error:[/] {escape(scrub_text(exc.render()))}", highlight=False, soft_wrap=True,
                      markup=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[bold red]interrupted[/] (exit 130)")
        sys.exit(130)
    except TyperException as exc:  # usage errors: unknown option, missing argument
        if hasattr(exc, "show"):
            exc.show()
        else:
            console.print(f"[bold red]error:[/] {exc}")
        sys.exit(getattr(exc, "exit_code", 2) or 2)
    sys.exit(returned if isinstance(returned, int) else 0)


if __name__ == "__main__":
    main()
