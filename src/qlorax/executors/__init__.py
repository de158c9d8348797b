"""Where runs execute, by name: `local` (processes here) or `ray` (a Ray cluster).

Every executor offers the interface of qlorax.executors.base.Executor (train one, run many)
and imports neither torch nor Ray at module level, so importing this package is cheap. A new
executor is one module plus one entry in EXECUTORS.
"""

from __future__ import annotations

from pathlib import Path

from qlorax.errors import ConfigError
from qlorax.executors.base import Executor, TrainRequest
from qlorax.executors.local import LocalExecutor, run_local
from qlorax.executors.ray import RayExecutor, run_ray

EXECUTORS: dict[str, type[LocalExecutor] | type[RayExecutor]] = {"local": LocalExecutor, "ray": RayExecutor}


def get_executor(name: str, *, address: str | None = None, shared_dir: Path | None = None) -> Executor:
    """The executor called `name` (exit 2 naming the choices otherwise)."""
    try:
        kind = EXECUTORS[name]
    except KeyError:
        raise ConfigError(f"--executor {name!r}: expected {' or '.join(EXECUTORS)}") from None
    return kind(address=address, shared_dir=shared_dir)


__all__ = ["EXECUTORS", "Executor", "TrainRequest", "get_executor", "run_local", "run_ray"]
