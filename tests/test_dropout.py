"""LoRA dropout masks: a pure function of (seed, micro-batch, module), cheap, and stable."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from qlorax.dropout import CounterDropout, DropoutStream, install_counter_dropout, keep_scale

# The bytes of one mask: numpy keeps SFC64's raw stream fixed across its versions, and this pin
# shows it (a change here changes every run's bits).
PINNED_MASK_SHA256 = "9cd21ac2f3bad48347e5259c68f8957eec47e2157435b63722cafa677e691438"


def test_a_mask_keeps_one_minus_p_of_the_elements_scaled_by_its_inverse() -> None:
    count, p = 1_000_003, 0.05
    mask = keep_scale(2024, count, p)
    assert mask.dtype == np.float32 and mask.shape == (count,)
    assert set(np.unique(mask).tolist()) == {0.0, float(np.float32(1 / (1 - p)))}
    dropped = float((mask == 0).mean())
    assert abs(dropped - p) < 5 * (p * (1 - p) / count) ** 0.5, dropped  # within 5 sigma
    # An odd count uses the low half of the last 64-bit draw; every prefix is the shorter mask.
    assert np.array_equal(keep_scale(2024, 7, p), mask[:7])
    assert keep_scale(1, 0, p).shape == (0,)


def test_the_mask_stream_is_pinned() -> None:
    digest = hashlib.sha256(keep_scale(12345, 1001, 0.1).tobytes()).hexdigest()
    assert digest == PINNED_MASK_SHA256, digest


def test_masks_depend_on_seed_micro_batch_and_module_only() -> None:
    x = torch.ones(2, 40, 64)

    def mask(seed: int, micro_batch: int, name: str) -> torch.Tensor:
        stream = DropoutStream(seed)
        stream.begin(micro_batch)
        return CounterDropout(0.25, name, stream).train()(x)

    q, k = "layers.0.q_proj.lora_dropout.default", "layers.0.k_proj.lora_dropout.default"
    first = mask(1, 3, q)
    assert torch.equal(first, mask(1, 3, q))
    for other in (mask(2, 3, q), mask(1, 4, q), mask(1, 3, k)):
        assert not torch.equal(first, other)


def test_installed_dropout_replaces_peft_s_and_backpropagates_through_its_mask() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlorax.config import LoraSection
    from qlorax.model import wrap_with_lora

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))
    model = wrap_with_lora(base, LoraSection(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "down_proj"]), 7,
                           "tiny")
    stream = install_counter_dropout(model, seed=99)
    replaced = [m for m in model.modules() if isinstance(m, CounterDropout)]
    assert len(replaced) == 4 and len({m.name for m in replaced}) == 4
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())

    module = replaced[0]
    x = torch.randn(1, 5, 32, requires_grad=True)
    model.train()
    with pytest.raises(RuntimeError, match="before DropoutStream.begin"):
        module(x)
    stream.begin(0)
    out = module(x)
    out.backward(torch.ones_like(out))
    expected = torch.from_numpy(keep_scale(stream.module_seed(module.name), x.numel(), 0.1)).view(x.shape)
    assert torch.equal(out, x * expected) and torch.equal(x.grad, expected)
    model.eval()
    assert module(x) is x  # no dropout outside training


def test_no_dropout_keeps_peft_s_identity() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlorax.config import LoraSection
    from qlorax.model import wrap_with_lora

    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    model = wrap_with_lora(base, LoraSection(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"]), 7, "tiny")
    install_counter_dropout(model, seed=1)
    assert not any(isinstance(m, CounterDropout) for m in model.modules())
