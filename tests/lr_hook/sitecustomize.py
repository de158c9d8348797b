"""Test-only fault injection: change the learning rate from a given step on, from outside.

Put this directory on PYTHONPATH for one `qlorax train` child and set
QLORAX_TEST_LR_FACTOR_FROM_STEP=STEP (and optionally QLORAX_TEST_LR_FACTOR, default 3):
once `qlorax.train` is imported, its `build_scheduler` is wrapped so that the learning
rate of optimizer step STEP and later is multiplied by the factor. Steps before STEP are
bit-identical to an untouched run, which is what lets test_verify check that the analysis
names the exact step and field ("lr") where two runs part. Production code knows nothing
of this; without the variable this module does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

FROM_STEP_VAR = "QLORAX_TEST_LR_FACTOR_FROM_STEP"
FACTOR_VAR = "QLORAX_TEST_LR_FACTOR"
TARGET = "qlorax.train"


def wrap_schedule(build: Callable[..., Any], from_step: int, factor: float) -> Callable[..., Any]:
    """A scheduler builder like `build` (qlorax.train.build_scheduler) whose multipliers are
    scaled for optimizer steps >= from_step.

    LambdaLR calls the multiplier with the number of steps already taken, so optimizer
    step N (1-based) runs with multiplier(N - 1)."""

    def scaled(inner: Callable[[int], float]) -> Callable[[int], float]:
        def multiplier(taken: int) -> float:
            value = inner(taken)
            return value * factor if taken + 1 >= from_step else value

        return multiplier

    def wrapped(optimizer: Any, name: str, warmup: int, total: int) -> Any:
        scheduler = build(optimizer, name, warmup, total)
        scheduler.lr_lambdas = [scaled(inner) for inner in scheduler.lr_lambdas]
        # The constructor already set the first step's lr from the unscaled multiplier.
        pairs = zip(optimizer.param_groups, scheduler.base_lrs, strict=True)
        for (group, base_lr), multiplier in zip(pairs, scheduler.lr_lambdas, strict=True):
            group["lr"] = base_lr * multiplier(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        return scheduler

    return wrapped


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Let the normal finder load qlorax.train, then wrap its schedule before anyone uses it."""

    def __init__(self, from_step: int, factor: float) -> None:
        self.from_step, self.factor = from_step, factor
        self.inner: importlib.abc.Loader | None = None

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            self.inner, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        assert self.inner is not None
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        assert self.inner is not None
        self.inner.exec_module(module)
        module.build_scheduler = wrap_schedule(module.build_scheduler, self.from_step, self.factor)


if os.environ.get(FROM_STEP_VAR):
    sys.meta_path.insert(0, _PatchOnImport(int(os.environ[FROM_STEP_VAR]), float(os.environ.get(FACTOR_VAR, "3"))))
