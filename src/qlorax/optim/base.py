"""What every optimizer module registers (qlorax.optim): how to build it and how it is named."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Optimizer:
    """One registered optimizer."""

    name: str
    label: str  # how messages name it
    description: str  # recorded in training_args.json (a deterministic artifact: never reword it)
    foreign_names: frozenset[str]  # other tools' names for it (HF `optim`, axolotl `optimizer`)
    # (trainable parameters, training section) -> torch optimizer; only exactly rounded
    # instructions, so that the portable profile can use it (qlorax.exact_math)
    build: Callable[[list[Any], Any], Any]
