"""Production operations: metrics, health, audit trail, run cache, resource admission, secrets.

Nothing here imports torch, and nothing here uses pickle: these modules run in `qlorax
serve`, in CI and next to training, and must start fast and never execute stored data.
Import the submodule you need (`qlorax.ops.metrics`, ...); `qlorax.AuditLogger`,
`qlorax.CacheManager` and `qlorax.ResourceManager` are also available lazily.
"""

from __future__ import annotations

__all__ = ["audit", "cache", "health", "metrics", "resources", "secrets"]
