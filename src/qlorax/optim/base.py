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
    # (trainable parameters, training section, exact_math) -> torch optimizer; exact_math: the
    # profile allows only exactly rounded instructions (qlorax.exact_math)
    build: Callable[[list[Any], Any, bool], Any]
    exact_math_description: str  # what the run records when built with exact_math

    def describe(self, exact_math: bool) -> str:
        return self.exact_math_description if exact_math else self.description
