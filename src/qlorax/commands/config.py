"""CLI commands about inputs, not runs: `config show`, `config schema`, `model path`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from qlorax.commands.training import SetOption

config_app = typer.Typer(help="Show the resolved config or its JSON Schema.", no_args_is_help=True)
model_app = typer.Typer(help="Base models.", no_args_is_help=True)


@config_app.command("show")
def config_show(config: Path | None = typer.Argument(None, help="YAML config to resolve."),
                as_json: bool = typer.Option(False, "--json", help="Canonical JSON instead of YAML."),
                set_: list[str] | None = SetOption) -> None:
    """Print the resolved config (defaults filled in) and its hash."""
    from qlorax.config import config_to_yaml
    from qlorax.runs import resolve_config

    cfg = resolve_config(config, set_)
    if as_json:
        print(json.dumps({"config": cfg.canonical(), "config_hash": cfg.config_hash()}, indent=2, sort_keys=True))
        return
    print(f"# config_hash: {cfg.config_hash()}")
    print(config_to_yaml(cfg), end="")


@config_app.command("schema")
def config_schema() -> None:
    """Print the config's JSON Schema."""
    from qlorax.config import config_json_schema

    print(json.dumps(config_json_schema(), indent=2, sort_keys=True))


@model_app.command("path")
def model_path(name: str = typer.Argument("qlorax/tiny-llama", help="Preset, local dir, GGUF file or hub id.")) -> None:
    """Print the local directory of a base model (building a preset or converting a GGUF file
    the first time)."""
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # no per-tensor progress bars while building
    from qlorax.config import ModelSection
    from qlorax.model import resolve_base_model

    print(resolve_base_model(ModelSection(name_or_path=name)).local_dir)


def register(app: typer.Typer) -> None:
    """Add this module's command groups to the top-level app."""
    app.add_typer(config_app, name="config")
    app.add_typer(model_app, name="model")
