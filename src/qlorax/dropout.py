"""LoRA dropout whose masks are a pure function of (seed, micro-batch, module), drawn cheaply.

PEFT gives every LoRA layer a `torch.nn.Dropout`, and torch draws its mask from the global
Mersenne Twister one element at a time: about 5 ns per element on these machines, ~10 % of a
SmolLM2 step (210 masks per micro-batch). qlorax replaces those modules (module replacement, as
PEFT itself adds them) with `CounterDropout`: each mask is 32-bit integers from numpy's SFC64
seeded with derive_seed(seed, "dropout:<micro-batch>:<module name>"), an element kept when its
integer is at least round(p * 2**32), and kept elements scaled by 1 / (1 - p) as torch does.

So a mask depends on nothing but the run's seed, the micro-batch's global index and the
module's name: not on which worker computes the micro-batch, where a run resumed, the thread
count or the processor (integer arithmetic only; numpy keeps a bit generator's raw stream
fixed across its versions, and tests/test_dropout.py pins one mask). About 2 ns per element.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from qlorax.checkpoint import DROPOUT_STREAM
from qlorax.determinism import derive_seed


class DropoutStream:
    """The micro-batch whose masks the model's dropout modules draw now, per thread (`begin`
    before each micro-batch's forward; micro-batches may run side by side: qlorax.micro_batches)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._current = threading.local()

    def begin(self, micro_batch: int) -> None:
        self._current.micro_batch = micro_batch

    def module_seed(self, module_name: str) -> int:
        micro_batch = getattr(self._current, "micro_batch", None)
        if micro_batch is None:
            raise RuntimeError("a LoRA dropout ran in training mode before DropoutStream.begin(micro_batch)")
        return derive_seed(self.seed, f"dropout:{micro_batch}:{module_name}")


def keep_scale(seed: int, count: int, p: float) -> np.ndarray:
    """`count` float32 values: 1 / (1 - p) where the element is kept, 0 where it is dropped."""
    raw = np.random.SFC64(seed).random_raw((count + 1) // 2).astype("<u8", copy=False)
    words = raw.view("<u4")[:count]  # both halves of every 64-bit draw, the same on any byte order
    threshold = np.uint32(min(round(p * 2**32), 2**32 - 1))
    return np.multiply(words >= threshold, np.float32(1.0 / (1.0 - p)), dtype=np.float32)  # one pass


class CounterDropout(torch.nn.Module):
    """Dropout with probability `p` whose mask comes from `stream` for this module's name;
    the identity in eval mode. Backward multiplies by the same mask (autograd of the product)."""

    def __init__(self, p: float, name: str, stream: DropoutStream) -> None:
        super().__init__()
        self.p, self.name, self.stream = p, name, stream

    def forward(self, x: Any) -> Any:
        if not self.training or self.p == 0.0:
            return x
        scale = keep_scale(self.stream.module_seed(self.name), x.numel(), self.p)
        return x * torch.from_numpy(scale).to(x.dtype).view(x.shape)

    def extra_repr(self) -> str:
        return f"p={self.p}, stream={DROPOUT_STREAM}"


def install_counter_dropout(model: Any, seed: int) -> DropoutStream:
    """Replace every LoRA layer's torch Dropout in `model` with a CounterDropout drawing from one
    new stream (seeded with the run's dropout seed); returns the stream."""
    stream = DropoutStream(seed)
    for owner_name, owner in list(model.named_modules()):
        if not owner_name.endswith("lora_dropout"):
            continue
        for adapter, module in list(owner.items()):
            if isinstance(module, torch.nn.Dropout):
                owner[adapter] = CounterDropout(module.p, f"{owner_name}.{adapter}", stream)
    return stream
