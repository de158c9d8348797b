"""SiLU and GELU with the one-thread bits at any thread count (qlorax.activations)."""

from __future__ import annotations

import pytest
import torch  # installed by `make test`: missing, this module fails instead of skipping

from qlorax.activations import ThreadFreeGELU, ThreadFreeSiLU, thread_free_version, use_thread_free_activations

# Sizes whose per-thread ranges do and do not end on a vector boundary at 2 and 3 threads.
SIZES = [801 * 688, 3 * 5 * 7 * 11 * 13 * 7, 100 * 1536, 17]
PAIRS = [(torch.nn.SiLU(), ThreadFreeSiLU()), (torch.nn.GELU(), ThreadFreeGELU("none")),
         (torch.nn.GELU(approximate="tanh"), ThreadFreeGELU("tanh"))]


def _value_and_gradient(x: torch.Tensor, grad: torch.Tensor, module: torch.nn.Module, threads: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    torch.set_num_threads(threads)
    x = x.clone().requires_grad_(True)
    out = module(x)
    out.backward(grad)
    return out.detach(), x.grad


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("aten", "free"), PAIRS, ids=["silu", "gelu", "gelu-tanh"])
def test_thread_free_activations_give_the_one_thread_bits_at_any_thread_count(
        size: int, aten: torch.nn.Module, free: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(size)
    x, grad = torch.randn(size, generator=generator) * 4, torch.randn(size, generator=generator)
    threads = torch.get_num_threads()
    try:
        reference = _value_and_gradient(x, grad, aten, 1)  # ATen's own, on one thread
        for count in (1, 2, 3):
            out, x_grad = _value_and_gradient(x, grad, free, count)
            assert torch.equal(out, reference[0]) and torch.equal(x_grad, reference[1]), count
    finally:
        torch.set_num_threads(threads)


def test_every_covered_activation_of_a_model_is_replaced() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.activations import ACT2FN

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=43, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2))
    before = model(torch.arange(20).reshape(2, 10)).logits
    assert use_thread_free_activations(model) == 3
    assert all(isinstance(layer.mlp.act_fn, ThreadFreeSiLU) for layer in model.model.layers)
    assert torch.equal(model(torch.arange(20).reshape(2, 10)).logits, before)
    assert isinstance(thread_free_version(ACT2FN["gelu"]), ThreadFreeGELU)
    assert thread_free_version(ACT2FN["gelu_pytorch_tanh"]).approximate == "tanh"
    assert thread_free_version(ACT2FN["gelu_new"]) is None  # a formula: not covered
