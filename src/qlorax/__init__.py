"""qlorax: reproducibility-first LoRA fine-tuning.

Imports stay light (no torch) so that commands which do not train start fast; the
public classes are loaded on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.4"

_LAZY = {
    "DeterministicConfig": "qlorax.determinism",
    "QualityGates": "qlorax.gates",
    "AuditLogger": "qlorax.ops.audit",
    "CacheManager": "qlorax.ops.cache",
    "ResourceManager": "qlorax.ops.resources",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qlorax' has no attribute {name!r}")
