"""CLI command `probe`: the first training step on other (emulated) processors, compared bit
for bit with this machine's (registered by qlorax.cli; the work is in qlorax.probe)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from qlorax.commands.training import ConfigOption, ProfileOption, SetOption
from qlorax.phases import announce
from qlorax.runboard import BoardRow, RunBoard


def probe(
    cpu: str = typer.Option(..., "--cpu", help="Processors, comma-separated: native and/or QEMU CPU models "
                            "(qemu-x86_64 -cpu help), e.g. native,Haswell-v4,EPYC-Rome-v1. native is always "
                            "run: it is the reference. Emulation costs ~100x per step, and importing torch, "
                            "transformers and peft takes 1-2 minutes: a tiny-preset probe takes 2-4 minutes "
                            "per emulated processor."),
    config: Path | None = ConfigOption,
    profile: str | None = ProfileOption,
    batch: str = typer.Option("2x32", "--batch", help="The fixed batch: SEQUENCESxTOKENS."),
    output_dir: Path = typer.Option(Path("runs/probe"), "--output-dir", "-o",
                                    help="Where <cpu>.json, <cpu>.safetensors, logs/ and probe_report.json go."),
    threads: int = typer.Option(1, "--threads", min=1, help="Threads per processor's child."),
    jobs: int | None = typer.Option(None, "--jobs", "-j", min=1,
                                    help="Processors probed at once (default: cores / threads)."),
    set_: list[str] | None = SetOption,
) -> None:
    """Run the first training step (forward, backward, clipping, one AdamW step) on each processor and
    compare the loss, every gradient and the updated LoRA weights with the native ones, bit for bit.
    Exit 0 when all agree, 1 when one differs or fails, 2 when the profile refuses a processor."""
    from qlorax.executors.emulation import parse_cpus
    from qlorax.probe import NATIVE, PROBE_LOGS, parse_batch, result_path
    from qlorax.usecases.probing import run_probe
    from qlorax.usecases.training import resolve_config

    announce("inputs: checking the config, the data and the base model")
    cfg = resolve_config(config, set_, None, profile)
    cpus = parse_cpus(cpu)
    with RunBoard(f"qlorax probe: the first training step on {len(cpus)} processor(s)",
                  [BoardRow(name, f"{threads} / 1 / {name}", started_marker=output_dir / PROBE_LOGS / f"{name}.log",
                            done_marker=result_path(output_dir, name))
                   for name in dict.fromkeys([NATIVE, *cpus])]):
        outcome = run_probe(cfg, cpus, output_dir, parse_batch(batch), threads, jobs)
    table = Table(title=f"qlorax probe: profile {cfg.determinism.profile}, batch {batch}")
    for column in ("processor", "CPUID model", "ATen", "seconds", "result", "detail"):
        table.add_column(column)
    for row in outcome.rows:
        table.add_row(row["cpu"], str(row["model"] or "-"), str(row["capability"] or "-"), f"{row['seconds']:.1f}",
                      row["status"], str(row["detail"] or ""))
    Console(width=200).print(table)
    print(f"report: {outcome.report_path}")
    raise typer.Exit(outcome.exit_code)


def register(app: typer.Typer) -> None:
    """Add the probe command to the top-level app."""
    app.command()(probe)
