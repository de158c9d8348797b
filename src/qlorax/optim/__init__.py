"""The optimizers registry: name -> how to build it, what the run records, which foreign names
(HF `optim`, axolotl `optimizer`) mean it. One module per optimizer; AdamW is the only one today.

torch is imported only inside the builders, and nothing above the foundation layer is
imported, so the config and `qlorax config import` can consult the registry without either.
A second optimizer is its module (an `OPTIMIZER`) plus an entry here, and then a config key to
choose it: `training.optimizer: Literal[OPTIMIZER_NAMES] = DEFAULT_OPTIMIZER` with
`json_schema_extra=added_in(2)`, so existing configs keep their hash."""

from __future__ import annotations

from typing import Any

from qlorax.errors import ConfigError
from qlorax.optim.adamw import OPTIMIZER as ADAMW
from qlorax.optim.base import Optimizer

OPTIMIZERS: dict[str, Optimizer] = {entry.name: entry for entry in (ADAMW,)}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)
DEFAULT_OPTIMIZER = ADAMW.name

__all__ = ["DEFAULT_OPTIMIZER", "OPTIMIZERS", "OPTIMIZER_NAMES", "Optimizer", "build_optimizer",
           "describe_optimizers", "from_foreign_name", "optimizer"]


def optimizer(name: str) -> Optimizer:
    """The registered optimizer `name`."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ConfigError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZER_NAMES)}") from None


def build_optimizer(name: str, params: list[Any], training: Any) -> Any:
    """The torch optimizer `name` over `params`, configured from the training section's values."""
    return optimizer(name).build(params, training)


def from_foreign_name(value: str) -> str | None:
    """The registered optimizer another tool's optimizer name means (case-insensitive), or None."""
    return next((entry.name for entry in OPTIMIZERS.values() if value.lower() in entry.foreign_names), None)


def describe_optimizers(field: str = "description") -> str:
    """What qlorax trains with, for messages and the config reference: the registered
    optimizers' descriptions (or labels), joined by "or"."""
    return " or ".join(getattr(entry, field) for entry in OPTIMIZERS.values())
