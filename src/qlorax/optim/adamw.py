"""AdamW, as every qlorax run trains since 0.2.4: torch.optim.AdamW with ATen's fused kernel, one
pass over each tensor (5x faster than the single-tensor kernel on a LoRA's 420 tensors), the same
bits whatever the parameter grouping or thread count, and only exactly rounded instructions (its
sqrt is `sqrtps`, where the single-tensor kernel's goes through MKL's vector math: qlorax.exact_math),
so every profile, portable included, runs the one kernel."""

from __future__ import annotations

from typing import Any, Protocol

from qlorax.optim.base import Optimizer


class AdamWSettings(Protocol):
    """The training-section values AdamW reads (qlorax.config's TrainingSection has them)."""

    learning_rate: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    weight_decay: float


def build(params: list[Any], training: AdamWSettings) -> Any:
    """torch.optim.AdamW over `params` with the config's learning rate, betas, epsilon and decay."""
    import torch

    return torch.optim.AdamW(params, lr=training.learning_rate, betas=(training.adam_beta1, training.adam_beta2),
                             eps=training.adam_epsilon, weight_decay=training.weight_decay, fused=True)


OPTIMIZER = Optimizer(
    name="adamw",
    label="AdamW",
    description="torch.optim.AdamW(fused=True)",
    foreign_names=frozenset({"adamw_torch", "adamw_hf", "adamw_torch_fused", "adamw", "adamw_8bit", "adamw_bnb_8bit",
                             "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch_4bit"}),
    build=build,
)
