"""The training objective and how it is measured: summed next-token loss over labelled tokens,
the token-weighted evaluation, perplexity. Used by the training loop, `qlorax eval` and the probe."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from qlorax.data import IGNORE_INDEX, TokenizedExample, collate

# Model families whose causal-LM head is exactly `lm_head(final hidden states)`: no logit
# scaling or soft-capping, so the head may be applied to the labelled rows alone.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


def summed_token_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Sum of next-token cross-entropy over labelled tokens (averaged by the caller).

    The vocabulary projection is most of a small model's work (SmolLM2: 49,152 x 576 per
    token), and with completion-only labels most positions have no label. For the families
    in PLAIN_HEAD_MODEL_TYPES the head runs on the labelled rows only. Rows without a label
    contribute exact zeros, so the gradients reaching the decoder (every LoRA before the
    head) are the same bits; a LoRA on lm_head itself and the summed loss get the same value
    summed over fewer rows (last bits may differ). Other families get full logits.
    No key/value cache: training never reads it back, and filling it copies every layer's K/V."""
    import torch.nn.functional as F

    labels = batch["labels"][:, 1:]
    inputs = model_inputs(batch)
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        logits = model(**inputs, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    hidden = model.get_decoder()(**inputs, use_cache=False)
    labelled = labels != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden.last_hidden_state[:, :-1, :][labelled])
    return F.cross_entropy(logits.float(), labels[labelled], reduction="sum")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What the model reads of a collated batch: the ids and the attention mask of padded rows, or
    the position ids of a packed row (qlorax.data.pack; no mask, so the model sees it is packed)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def refuse_unpackable_model(model: Any, model_name: str) -> None:
    """training.packing needs a model whose attention follows packed position ids (transformers'
    masking utilities, as the PLAIN_HEAD_MODEL_TYPES families use): elsewhere examples could
    attend to each other, so refuse (exit 2) rather than train on that."""
    from qlorax.errors import ConfigError

    family = getattr(model.config, "model_type", None)
    if family not in PLAIN_HEAD_MODEL_TYPES:
        raise ConfigError(f"training.packing: {model_name} is a {family or 'unknown'} model; packing keeps each "
                          f"example's attention to itself for {', '.join(sorted(PLAIN_HEAD_MODEL_TYPES))} models "
                          "only: set training.packing: false")


def target_tokens(batch: dict[str, Any]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def evaluate(model: Any, examples: list[TokenizedExample], batch_size: int, pad_id: int,
             on_batch: Callable[[int, int], None] | None = None) -> tuple[float, int]:
    """Token-weighted mean loss over the eval split (dropout off); `on_batch(k, n)` after each
    of the n batches (progress display only)."""
    import torch

    if not examples:
        return float("nan"), 0
    model.eval()
    total, tokens = 0.0, 0
    batches = math.ceil(len(examples) / batch_size)
    with torch.no_grad():
        for number, start in enumerate(range(0, len(examples), batch_size), start=1):
            batch = collate(examples[start : start + batch_size], pad_id)
            total += float(summed_token_loss(model, batch))
            tokens += target_tokens(batch)
            if on_batch is not None:
                on_batch(number, batches)
    model.train()
    return total / max(tokens, 1), tokens


def perplexity(loss: float) -> float:
    if math.isnan(loss):
        return loss
    return math.exp(min(loss, 700.0))
