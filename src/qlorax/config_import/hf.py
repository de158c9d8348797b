"""Hugging Face TrainingArguments: the converters of its keys (TRL inherits them, axolotl
mirrors several) and HF's defaults where they differ from qlorax's."""

from __future__ import annotations

from typing import Any

from qlorax.config_import.common import Converter, Untranslatable
from qlorax.optim import describe_optimizers, from_foreign_name

SCHEDULERS = {"linear", "cosine", "constant", "constant_with_warmup"}

# HF's defaults applied to keys the file leaves out (an HF run without warmup_steps has none;
# qlorax's default would warm up for 4 steps).
DEFAULTS: dict[str, Any] = {"learning_rate": 5e-5, "warmup_steps": 0, "num_train_epochs": 3.0}


def _positive_steps(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    """HF/axolotl use -1, 0 or null for "not set"; a float below 1 is HF's fraction of training."""
    if value is None or (isinstance(value, int | float) and value <= 0):
        return {}
    if isinstance(value, float) and value < 1:
        raise Untranslatable(f"{value} is a fraction of the training steps; qlorax counts {target} in steps")
    return {target: int(value) if isinstance(value, float) and value.is_integer() else value}


def _epochs(value: Any, source: dict[str, Any], target: str) -> dict[str, Any]:
    if isinstance(source.get("max_steps"), int | float) and source["max_steps"] > 0:
        raise Untranslatable("max_steps > 0 is also set and overrides it (in HF and axolotl too)")
    return {target: value}


def _warmup_ratio(value: Any, source: dict[str, Any], target: str) -> dict[str, Any]:
    if not value:
        return {}
    if source.get("warmup_steps"):
        raise Untranslatable("warmup_steps > 0 is also set and overrides it (in HF too)")
    return {target: value}


def _scheduler(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    if value in SCHEDULERS:
        return {target: value}
    raise Untranslatable(f"schedule {value!r} is not one of qlorax's {', '.join(sorted(SCHEDULERS))}")


def _optimizer(value: Any, _source: dict[str, Any], _target: str) -> dict[str, Any]:
    """An optimizer name another tool uses for one in qlorax.optim's registry translates to
    nothing (there is one, and no key to choose it); any other is unmapped."""
    if from_foreign_name(str(value)) is not None:
        return {}
    raise Untranslatable(f"optimizer {value!r} is not {describe_optimizers('label')}; qlorax trains with "
                         f"{describe_optimizers()} only")


CONVERTERS: dict[str, Converter] = {
    "positive_steps": _positive_steps, "epochs": _epochs, "warmup_ratio": _warmup_ratio,
    "scheduler": _scheduler, "optimizer": _optimizer,
}
