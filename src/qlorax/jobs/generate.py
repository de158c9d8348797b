"""The `generate` job: completions of prompts by a finished run's base + adapter, written as
JSON Lines (token ids included) to the file the parent named. Nothing in a line depends on
the thread count, the time or the paths: same inputs, same bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlorax.artifacts import canonical_json, write_bytes_atomic
from qlorax.generate import Sampling, generate_completions
from qlorax.jobs.common import open_run_model


def run(payload: dict[str, Any]) -> int:
    config, tokenizer, model = open_run_model(payload)
    prompts = list(payload["prompts"])
    sampling = Sampling(**payload["sampling"]) if payload.get("sampling") else None
    max_new_tokens = int(payload["max_new_tokens"])
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens, fmt=config.data.format,
                                       sampling=sampling)
    generation = {"run": payload["run_digest"], "max_new_tokens": max_new_tokens,
                  "decoding": sampling.record() if sampling else {"mode": "greedy"}}
    lines = [canonical_json({"id": prompt["id"], "instruction": prompt["instruction"], "input": prompt["input"],
                             "completion": done["completion"], "token_ids": done["token_ids"],
                             "generation": generation}) + "\n"
             for prompt, done in zip(prompts, completions, strict=True)]
    write_bytes_atomic(Path(payload["result"]), "".join(lines).encode("utf-8"))
    return 0
