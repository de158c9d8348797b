"""The `export` job (--merge): the run's adapter merged into its base model
(`merge_and_unload`) and saved with `save_pretrained` as safetensors into the staging
directory the parent made; the parent adds the tokenizer, export.json and the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlorax.jobs.common import open_run_model


def run(payload: dict[str, Any]) -> int:
    _config, _tokenizer, model = open_run_model(payload)
    merged = model.merge_and_unload()
    merged.save_pretrained(Path(payload["output"]), safe_serialization=True)
    return 0
