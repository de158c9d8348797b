"""SiLU and GELU whose bits do not depend on the thread count.

ATen runs an elementwise op on T threads by giving each a contiguous range of ceil(n / T)
elements; inside a range its vectorised kernel takes two vectors at a time and the last few
elements go through the scalar kernel. For SiLU (an exp inside) and GELU (erf or tanh) the two
kernels round differently, so an element's bits depend on whether it falls in a range's tail,
that is on T, whenever ceil(n / T) is not a multiple of two vectors (32 floats on AVX-512).
Measured: one element of a 801 x 688 SiLU, forward and backward, differs between 1 and 2
threads; the tiny preset (688 wide) on a packed row of odd length trained other bits at 2
threads. Sizes like SmolLM2's (1536 wide) happened to divide evenly at 2, 3 and 4 threads,
not at 5.

`use_thread_free_activations` replaces a model's SiLU and GELU modules (module replacement, as
PEFT adds its layers) by ones that compute the activation and its gradient in pieces (32768
elements for SiLU, ATen's grain size; 4096 for GELU, whose kernel goes multi-threaded above
6144): each piece is computed by one thread, and every piece starts at a multiple of every
vector width. That is exactly the one-thread computation, at any
thread count: one-thread bits do not change. Covered: torch's nn.SiLU and nn.GELU and
transformers' SiLU, GELU and tanh-GELU modules (Llama, Mistral, Qwen, Phi-3, Gemma, ...);
activations written as formulas (transformers' "gelu_new", "quick_gelu") keep ATen's kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

PIECE = 32768  # ATen's elementwise grain size: a piece this long runs on the calling thread
# GELU's kernel picks its own grain (it goes multi-threaded above 6144 elements): smaller pieces.
GELU_PIECE = 4096


def in_pieces(kernel: Callable[..., Any], first: Any, *others: Any, piece: int = PIECE) -> Any:
    """`kernel(piece of first, pieces of others..., out=piece of the result)` over aligned pieces."""
    first = first.contiguous()
    flat = [tensor.contiguous().view(-1) for tensor in (first, *others)]
    result = torch.empty_like(first)
    out = result.view(-1)
    for start in range(0, out.numel(), piece):
        kernel(*(tensor[start : start + piece] for tensor in flat), out[start : start + piece])
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


class _GELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Any, approximate: str) -> Any:
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        return in_pieces(lambda piece, out: torch.ops.aten.gelu.out(piece, approximate=approximate, out=out), x,
                         piece=GELU_PIECE)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        (x,) = ctx.saved_tensors
        return in_pieces(lambda g, piece, out: torch.ops.aten.gelu_backward.grad_input(
            g, piece, approximate=ctx.approximate, grad_input=out), grad, x, piece=GELU_PIECE), None


class ThreadFreeSiLU(torch.nn.Module):
    """x * sigmoid(x), the one-thread bits at any thread count."""

    def forward(self, x: Any) -> Any:
        return _SiLU.apply(x)


class ThreadFreeGELU(torch.nn.Module):
    """GELU (exact, or its tanh approximation), the one-thread bits at any thread count."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Any) -> Any:
        return _GELU.apply(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


def thread_free_version(module: Any) -> Any | None:
    """The thread-free module computing what `module` computes, or None for one not covered."""
    import functools

    from transformers.activations import GELUActivation, GELUTanh, SiLUActivation

    if isinstance(module, (torch.nn.SiLU, SiLUActivation)):
        return ThreadFreeSiLU()
    if isinstance(module, torch.nn.GELU):
        return ThreadFreeGELU(module.approximate)
    act = getattr(module, "act", None)
    if isinstance(module, GELUActivation) and act is torch.nn.functional.gelu:
        return ThreadFreeGELU("none")
    if isinstance(module, GELUTanh) and isinstance(act, functools.partial) and act.func is torch.nn.functional.gelu:
        return ThreadFreeGELU(act.keywords.get("approximate", "none"))
    return None


def use_thread_free_activations(model: Any) -> int:
    """Replace every covered activation module of `model` by its thread-free version; returns how
    many were replaced."""
    replaced = 0
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            free = thread_free_version(child)
            if free is not None:
                setattr(owner, name, free)
                replaced += 1
    return replaced
