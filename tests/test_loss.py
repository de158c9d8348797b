"""The training loss: the head runs on labelled rows only, and that changes no gradient."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def full_logits_loss(model, batch):  # type: ignore[no-untyped-def]
    """The textbook form: logits at every position, then masked cross-entropy."""
    import torch.nn.functional as F

    from qlorax.data import IGNORE_INDEX

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1, :].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def lora_grads(model, loss_fn, batch):  # type: ignore[no-untyped-def]
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], ["q_proj", "lm_head"]])
def test_labelled_rows_loss_gives_the_same_lora_gradients(targets: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    from qlorax.config import LoraSection
    from qlorax.data import IGNORE_INDEX, TokenizedExample, collate
    from qlorax.loss import PLAIN_HEAD_MODEL_TYPES, summed_token_loss
    from qlorax.model import wrap_with_lora
    from qlorax.model_presets import materialize_preset

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(materialize_preset(), dtype=torch.float32)
    assert base.config.model_type in PLAIN_HEAD_MODEL_TYPES
    model = wrap_with_lora(base, LoraSection(r=4, alpha=8, dropout=0.0, target_modules=targets), 7, "tiny")
    # Two sequences of different lengths, prompts masked: a third of the positions labelled.
    def example(length: int, prompt: int) -> TokenizedExample:
        ids = [(17 * i + length) % 500 + 3 for i in range(length)]
        return TokenizedExample(line=1, input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:])

    batch = collate([example(30, 20), example(24, 14)], pad_id=0)
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert 0 < labelled < batch["labels"][:, 1:].numel() // 2

    full_loss, full = lora_grads(model, full_logits_loss, batch)
    rows_loss, rows = lora_grads(model, summed_token_loss, batch)
    assert full.keys() == rows.keys() and len(full) >= 2 * len(targets)
    for name in full:
        if "lm_head" in name:  # the head's own LoRA sums over fewer rows: same value, maybe not same bits
            assert torch.allclose(full[name], rows[name], rtol=1e-5, atol=1e-9), name
        else:  # everything before the head receives exactly the same gradient
            assert torch.equal(full[name], rows[name]), name
    assert torch.allclose(full_loss, rows_loss, rtol=1e-6)
