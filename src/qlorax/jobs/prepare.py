"""The `prepare` job: build the base model (a preset or a GGUF conversion) into the model
cache once, before a verification starts its runs in parallel (each would build it)."""

from __future__ import annotations

from typing import Any

from qlorax.config import parse_config
from qlorax.model import resolve_base_model


def run(payload: dict[str, Any]) -> int:
    config = parse_config(payload["config"], "resolved config")
    info = resolve_base_model(config.model)
    print(f"base model {info.stable_id} ready in {info.local_dir}", flush=True)
    return 0
