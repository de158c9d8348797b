"""The `eval` job: token-weighted loss and perplexity of a data file under the base model and
under base + adapter (the same loaded model, its adapter disabled for the first), computed
exactly as training computes its eval loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlorax.artifacts import write_json_atomic
from qlorax.config import DataSection
from qlorax.data import read_data_file
from qlorax.inputs import data_identity
from qlorax.jobs.common import open_run_model
from qlorax.tokenized_cache import tokenized_dataset


def run(payload: dict[str, Any]) -> int:
    from qlorax.loss import evaluate, perplexity

    config, tokenizer, model = open_run_model(payload)
    section = DataSection.model_validate(payload["data_section"])
    data, _ = tokenized_dataset(read_data_file(section), section, tokenizer, str(payload["base_digest"]),
                                config.training.seed)
    examples, batch_size, pad_id = data.train, config.training.eval_batch_size, tokenizer.pad_token_id
    with model.disable_adapter():
        base_loss, tokens = evaluate(model, examples, batch_size, pad_id)
    adapter_loss, _ = evaluate(model, examples, batch_size, pad_id)
    write_json_atomic(Path(payload["result"]), {
        "run": payload["run_digest"],
        "data": {"path": data_identity(section.path, section.allow_moving_ref), "sha256": data.data_sha256,
                 "format": section.format, "examples": len(examples), "target_tokens": tokens,
                 "truncated_examples": data.truncated,
                 **({"commit": data.data_commit} if data.data_commit else {})},
        "base": {"loss": base_loss, "perplexity": perplexity(base_loss)},
        "adapter": {"loss": adapter_loss, "perplexity": perplexity(adapter_loss)},
    })
    return 0
