"""AdamW, as every qlorax run so far has trained: torch.optim.AdamW with the single-tensor
(foreach=False) kernel, whose update is the same bits whatever the parameter grouping. Under an
exact-math profile (portable) ATen's fused kernel instead: its sqrt is the exactly rounded
instruction, where the single-tensor kernel's goes through MKL's vector math (qlorax.exact_math)."""

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


def build(params: list[Any], training: AdamWSettings, exact_math: bool = False) -> Any:
    """torch.optim.AdamW over `params` with the config's learning rate, betas, epsilon and decay."""
    import torch

    kernel = {"fused": True} if exact_math else {"foreach": False}
    return torch.optim.AdamW(params, lr=training.learning_rate, betas=(training.adam_beta1, training.adam_beta2),
                             eps=training.adam_epsilon, weight_decay=training.weight_decay, **kernel)


OPTIMIZER = Optimizer(
    name="adamw",
    label="AdamW",
    description="torch.optim.AdamW(foreach=False)",
    exact_math_description="torch.optim.AdamW(fused=True)",
    foreign_names=frozenset({"adamw_torch", "adamw_hf", "adamw_torch_fused", "adamw", "adamw_8bit", "adamw_bnb_8bit",
                             "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch_4bit"}),
    build=build,
)
