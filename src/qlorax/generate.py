"""Generation from a (LoRA-wrapped) model: the training's samples.jsonl and `qlorax generate`.

Greedy by default, so a completion is a pure function of the weights and the prompt: two
bit-identical adapters give byte-identical samples. Sampling (`Sampling`) seeds torch's
generator per prompt from (seed, prompt position), so a completion is a pure function of
the weights, the prompt, its position and the seed. Prompts are alpaca
records ({"id", "instruction", "input"}), rendered as the run's data format renders its
prompts (qlorax.formats: the alpaca template, or the tokenizer's chat template for chat data).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorax.data import bundled_path
from qlorax.formats import DEFAULT_FORMAT, data_format

EVAL_PROMPTS = "eval_prompts.jsonl"
DEFAULT_MAX_NEW_TOKENS = 24


@dataclass(frozen=True)
class Sampling:
    """Multinomial sampling instead of greedy decoding: temperature, nucleus (top-p), seed."""

    temperature: float
    top_p: float
    seed: int

    def record(self) -> dict[str, Any]:
        return {"mode": "sample", "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


def read_prompt_records(path: Path | None = None) -> list[dict[str, Any]]:
    """Prompt records from a JSONL file, by default the bundled evaluation prompts."""
    path = bundled_path(EVAL_PROMPTS) if path is None else Path(path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prompt_token_ids(tokenizer: Any, prompt: dict[str, Any], fmt: str) -> list[int]:
    """A prompt record rendered exactly as training renders its prompts in data format `fmt`:
    the alpaca template after BOS, or (for chat-format runs) the tokenizer's chat template with
    one user turn and the generation prompt."""
    return data_format(fmt).prompt_ids(tokenizer, prompt["instruction"], prompt.get("input", ""))


def generate_completions(model: Any, tokenizer: Any, prompts: list[dict[str, Any]],
                         max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, fmt: str = DEFAULT_FORMAT,
                         sampling: Sampling | None = None,
                         on_sample: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """One completion per prompt record: {"id", "completion", "token_ids"}; greedy unless
    `sampling` is given. Prompts are rendered as data format `fmt` renders them (the run's).
    `on_sample(k, n)` after each of the n prompts (progress display only).

    The model is put in eval mode (no dropout) and back in train mode afterwards, so a
    training run can call this between steps."""
    import torch

    from qlorax.determinism import derive_seed

    decoding: dict[str, Any] = {"do_sample": False}
    if sampling is not None:  # top_k=0: no top-k cut beyond what top_p asks (a model's default may set one)
        decoding = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    samples = []
    model.eval()
    for position, prompt in enumerate(prompts):
        ids = prompt_token_ids(tokenizer, prompt, fmt)
        if sampling is not None:
            torch.manual_seed(derive_seed(sampling.seed, f"generate:{position}"))
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, **decoding,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completion = out[0, len(ids):].tolist()
        samples.append({"id": prompt["id"], "completion": tokenizer.decode(completion, skip_special_tokens=True),
                        "token_ids": completion})
        if on_sample is not None:
            on_sample(position + 1, len(prompts))
    model.train()
    return samples
