"""What is published: a finished run directory, re-checked against its manifest first.

A run directory is an adapter (`base_model_relation: adapter`); an export directory (`qlorax
export --merge`, a merged model) becomes another `PublishSource` with relation `merge` and the
same card, staging and upload. Its JSON files are read once here, for the card and the tags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlorax import layout
from qlorax.analysis.workflow import run_check
from qlorax.artifacts import load_manifest, read_json
from qlorax.errors import QloraxError
from qlorax.publish.errors import PublishRefused


@dataclass
class PublishSource:
    """What is published: a directory with a manifest and what the card says it is."""

    directory: Path
    manifest: dict[str, Any]
    relation: str  # "adapter" (a run directory) or "merge" (an export directory, later)
    results: dict[str, Any]
    resolved_config: dict[str, Any]
    env: dict[str, Any] = field(default_factory=dict)  # env.json, when the run has one

    @property
    def adapter_sha256(self) -> str:
        return str(self.manifest["files"].get(layout.ADAPTER_WEIGHTS, {}).get("sha256", ""))

    @property
    def deterministic_digest(self) -> str:
        return str(self.manifest.get("deterministic_digest", ""))


def checked_run(run_dir: Path) -> PublishSource:
    """The run directory, re-checked against its manifest first; PublishRefused naming what fails."""
    run_dir = Path(run_dir)
    integrity = run_check(run_dir)
    if not integrity["has_manifest"]:
        raise QloraxError(f"{run_dir}: no {layout.MANIFEST}; only a finished run directory can be published.")
    if not integrity["intact"]:
        found = [f"{kind} {', '.join(integrity[kind])}" for kind in ("altered", "missing", "extra")
                 if integrity[kind]] + list(integrity.get("manifest_errors") or [])
        raise PublishRefused(f"{run_dir}: refusing to publish: the run does not match its manifest "
                             f"({'; '.join(found)}). Run `qlorax check {run_dir}` for details.")
    manifest = load_manifest(run_dir) or {}
    if layout.ADAPTER_WEIGHTS not in manifest.get("files", {}):
        raise QloraxError(f"{run_dir}: the manifest lists no {layout.ADAPTER_WEIGHTS}; nothing to publish.")
    env = read_json(run_dir / layout.ENV) if (run_dir / layout.ENV).is_file() else {}
    return PublishSource(run_dir, manifest, "adapter", read_json(run_dir / layout.RESULTS),
                         read_json(run_dir / layout.RESOLVED_CONFIG), env)
