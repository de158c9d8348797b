"""CLI commands that use a finished run: generate, eval, export.

Each parses its options, calls one use case in `qlorax.usecases.inference` (which runs the model in
a pinned child process), renders the result and ends with `raise typer.Exit(code)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)

RunDirArgument = typer.Argument(..., help="A finished run directory (written by `qlorax train`).")
ThreadsOption = typer.Option(None, "--threads", min=1, help="Threads (default: all cores); never changes the result.")


def generate(
    run_dir: Path = RunDirArgument,
    prompt: list[str] | None = typer.Option(None, "--prompt", metavar="TEXT", help="A prompt (repeatable)."),
    prompts: Path | None = typer.Option(None, "--prompts", help="JSONL of {\"instruction\", \"input\"?, \"id\"?}."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, max=4096,
                                              help="Default: the run's training.sample_max_new_tokens."),
    temperature: float | None = typer.Option(None, "--temperature", min=0.0,
                                             help="Sample at this temperature (default: greedy decoding)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (with --temperature)."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Sampling seed (default: the run's seed)."),
    threads: int | None = ThreadsOption,
    output: Path | None = typer.Option(None, "--output", "-o",
                                       help="Write JSON Lines here (and FILE.sha256 beside it)."),
) -> None:
    """Complete prompts with a run's base model + adapter, rendered with the run's template."""
    from qlorax.usecases.inference import generate as generate_use_case
    from qlorax.usecases.inference import prompt_records

    records = prompt_records(prompt, prompts)
    outcome = generate_use_case(run_dir, records, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed, threads=threads, output=output)
    if outcome.exit_code != 0:
        raise typer.Exit(outcome.exit_code)
    for record in outcome.records:
        print(f"[{record['id']}] {record['instruction']}\n{record['completion']}\n")
    where = f"{output} " if output else ""
    console.print(f"{len(outcome.records)} completions {where}(sha256 {outcome.sha256})", markup=False)
    raise typer.Exit(0)


def eval_(
    run_dir: Path = RunDirArgument,
    data: str = typer.Option(..., "--data", help="Held-out data: a JSONL file, builtin:NAME or git+URL@REF#PATH."),
    data_format: str | None = typer.Option(None, "--format", help="alpaca | chat | raw (default: the run's)."),
    threads: int | None = ThreadsOption,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Loss and perplexity on a data file: the base model and base + adapter, side by side."""
    from qlorax.usecases.inference import evaluate

    code, result = evaluate(run_dir, data, data_format, threads)
    if code != 0:
        raise typer.Exit(code)
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
        raise typer.Exit(0)
    facts = result["data"]
    table = Table(title=f"{run_dir}: {facts['examples']} examples, {facts['target_tokens']} target tokens")
    table.add_column("")
    table.add_column("base model", justify="right")
    table.add_column("base + adapter", justify="right")
    table.add_row("loss (nats/token)", f"{result['base']['loss']:.4f}", f"{result['adapter']['loss']:.4f}")
    table.add_row("perplexity", f"{result['base']['perplexity']:.2f}", f"{result['adapter']['perplexity']:.2f}")
    Console().print(table)
    raise typer.Exit(0)


def export(
    run_dir: Path = RunDirArgument,
    output: Path = typer.Option(..., "--output", "-o", help="Export directory to create."),
    merge: bool = typer.Option(False, "--merge", help="Merge the adapter into the base model (merge_and_unload)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --output."),
    threads: int | None = ThreadsOption,
) -> None:
    """Export a run: the adapter alone, or merged into the base (plain transformers loads it)."""
    from qlorax.usecases.inference import export_run

    outcome = export_run(run_dir, output, merge=merge, force=force, threads=threads)
    if outcome.exit_code != 0:
        raise typer.Exit(outcome.exit_code)
    kind = "merged model" if merge else "adapter"
    console.print(f"exported the {kind} of {run_dir} to {output} ({outcome.manifest['artifact_count']} files, "
                  f"deterministic digest {outcome.manifest['deterministic_digest']})", markup=False)
    raise typer.Exit(0)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command()(generate)
    app.command("eval")(eval_)
    app.command()(export)
