"""CLI commands about inputs, not runs: `config show|schema|import|reference`, `model path`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
import yaml

from qlorax import settings
from qlorax.commands.training import SetOption

config_app = typer.Typer(help="Show the resolved config or its JSON Schema; import another tool's config.",
                         no_args_is_help=True)
model_app = typer.Typer(help="Base models.", no_args_is_help=True)


@config_app.command("show")
def config_show(config: Path | None = typer.Argument(None, help="YAML config to resolve."),
                as_json: bool = typer.Option(False, "--json", help="Canonical JSON instead of YAML."),
                set_: list[str] | None = SetOption) -> None:
    """Print the resolved config (defaults filled in) and its hash."""
    from qlorax.config import config_to_yaml
    from qlorax.inputs import config_hash
    from qlorax.usecases.training import resolve_config

    cfg = resolve_config(config, set_)
    shown = shown_config(cfg.canonical())
    if as_json:
        print(json.dumps({"config": shown, "config_hash": config_hash(cfg)}, indent=2, sort_keys=True))
        return
    print(f"# config_hash: {config_hash(cfg)}")
    print(config_to_yaml(cfg) if shown == cfg.canonical() else yaml.safe_dump(shown, sort_keys=False), end="")


def shown_config(form: dict[str, Any]) -> dict[str, Any]:
    """The config as it may be printed (CI logs keep it): a value that is a token's (HF_TOKEN,
    HUGGINGFACE_TOKEN, ...) is replaced, and stderr names the key that held it."""
    from qlorax.ops.secrets import keys_holding_secrets, redact

    keys = keys_holding_secrets(form)
    if not keys:
        return form
    print(f"warning: config key(s) {', '.join(keys)} hold the value of a secret (a token in the environment); "
          "shown redacted. `qlorax train` refuses such a config: pass tokens only with --token-file.",
          file=sys.stderr)
    return redact(form)


@config_app.command("schema")
def config_schema() -> None:
    """Print the config's JSON Schema."""
    from qlorax.config import config_json_schema

    print(json.dumps(config_json_schema(), indent=2, sort_keys=True))


@config_app.command("import")
def config_import(file: Path = typer.Argument(..., help="The other tool's config (YAML, or JSON for HF)."),
                  from_: str = typer.Option(..., "--from", help="axolotl, trl or hf (TrainingArguments)."),
                  output: Path | None = typer.Option(None, "-o", "--output", help="Write the qlorax YAML here "
                                                     "(default: stdout, with the report on stderr).")) -> None:
    """Translate an axolotl, TRL or HF TrainingArguments config into a qlorax config; list what
    was translated and every key with no qlorax equivalent. Exit 0 when the result validates."""
    from qlorax.artifacts import write_text_atomic
    from qlorax.config import parse_config
    from qlorax.config_import import TOOLS, import_config, read_foreign_config
    from qlorax.errors import ConfigError

    if from_ not in TOOLS:
        raise ConfigError(f"--from {from_!r}: expected one of {', '.join(TOOLS)}")
    from qlorax.inputs import config_hash

    report = import_config(from_, read_foreign_config(file))
    out = sys.stdout if output is not None else sys.stderr
    print(f"translated from {TOOLS[from_]} ({file.name}):", file=out)
    for line in report.translated:
        print(f"  {line}", file=out)
    print(f"no qlorax equivalent ({len(report.unmapped)}):", file=out)
    for line in report.unmapped:
        print(f"  {line}", file=out)
    cfg = parse_config(report.config, f"the config imported from {file}")
    text = (f"# imported from {TOOLS[from_]} config {file.name} by `qlorax config import`; "
            f"config_hash {config_hash(cfg)}\n" + yaml.safe_dump(report.config, sort_keys=False))
    if output is None:
        print(text, end="")
        return
    write_text_atomic(output, text)
    print(f"wrote {output} (config_hash {config_hash(cfg)})")


@config_app.command("reference")
def config_reference(output: Path | None = typer.Option(None, "-o", "--output", help="Write the page here "
                                                        "(default: stdout).")) -> None:
    """Print the config reference (Markdown): every key, type, default, range and its HF, TRL and
    axolotl names, generated from the config models (docs/config-reference.md is this output)."""
    from qlorax.artifacts import write_text_atomic
    from qlorax.config_reference import render_config_reference

    page = render_config_reference()
    if output is None:
        print(page, end="")
        return
    write_text_atomic(output, page)


@model_app.command("path")
def model_path(name: str = typer.Argument("qlorax/tiny-llama", help="Preset, local dir, GGUF file or hub id.")) -> None:
    """Print the local directory of a base model (building a preset or converting a GGUF file
    the first time)."""

    settings.quiet_progress_bars()  # no per-tensor progress bars while building
    from qlorax.config import ModelSection
    from qlorax.model import resolve_base_model

    print(resolve_base_model(ModelSection(name_or_path=name)).local_dir)


def register(app: typer.Typer) -> None:
    """Add this module's command groups to the top-level app."""
    app.add_typer(config_app, name="config")
    app.add_typer(model_app, name="model")
