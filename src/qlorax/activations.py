"""SiLU whose bits do not depend on the thread count.

ATen runs an elementwise op on T threads by giving each a contiguous range of ceil(n / T)
elements; inside a range its vectorised kernel takes two vectors at a time and the last few
elements go through the scalar kernel. For SiLU (an exp inside) the two kernels round
differently, so an element's bits depend on whether it falls in a range's tail, that is on T,
whenever ceil(n / T) is not a multiple of two vectors (32 floats on AVX-512). Measured: one
element of a 801 x 688 SiLU, forward and backward, differs between 1 and 2 threads; the tiny
preset (688 wide) on a packed row of odd length trained other bits at 2 threads. Sizes like
SmolLM2's (1536 wide) happened to divide evenly at 2, 3 and 4 threads, not at 5.

`ThreadFreeSiLU` replaces a model's SiLU modules (module replacement, as PEFT adds its layers)
and computes SiLU and its gradient in pieces of 32768 elements: each piece is below ATen's
grain size, so one thread computes it, and every piece starts at a multiple of every vector
width. That is exactly the one-thread computation, at any thread count: one-thread bits do not
change. Only SiLU is covered (Llama, Mistral, Qwen, Phi-3 MLPs); GELU models keep ATen's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

PIECE = 32768  # ATen's elementwise grain size: a piece this long runs on the calling thread


def in_pieces(kernel: Callable[..., Any], first: Any, *others: Any) -> Any:
    """`kernel(piece of first, pieces of others..., out=piece of the result)` over aligned pieces."""
    first = first.contiguous()
    flat = [tensor.contiguous().view(-1) for tensor in (first, *others)]
    result = torch.empty_like(first)
    out = result.view(-1)
    for start in range(0, out.numel(), PIECE):
        kernel(*(tensor[start : start + PIECE] for tensor in flat), out[start : start + PIECE])
    return result


class _SiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Any) -> Any:
        ctx.save_for_backward(x)
        return in_pieces(lambda piece, out: torch.ops.aten.silu.out(piece, out=out), x)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        (x,) = ctx.saved_tensors
        return in_pieces(lambda g, piece, out: torch.ops.aten.silu_backward.grad_input(g, piece, grad_input=out),
                         grad, x)


class ThreadFreeSiLU(torch.nn.Module):
    """x * sigmoid(x), the one-thread bits at any thread count."""

    def forward(self, x: Any) -> Any:
        return _SiLU.apply(x)


def use_thread_free_silu(model: Any) -> int:
    """Replace every SiLU module of `model` (torch's and transformers') by ThreadFreeSiLU; returns
    how many were replaced."""
    from transformers.activations import SiLUActivation

    replaced = 0
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if isinstance(child, (torch.nn.SiLU, SiLUActivation)):
                setattr(owner, name, ThreadFreeSiLU())
                replaced += 1
    return replaced
