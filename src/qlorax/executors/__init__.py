"""Where `qlorax verify` runs its N trainings: `local` (processes here) or `ray` (a Ray cluster).

Both take the same RunSpecs and return {run index: exit code}. Neither imports torch or Ray
at module level, so importing this package is cheap.
"""

from __future__ import annotations

from qlorax.executors.local import run_local
from qlorax.executors.ray import run_ray

__all__ = ["run_local", "run_ray"]
