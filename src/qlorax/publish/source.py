"""What is published: a finished run directory, re-checked against its manifest first.

A run directory is an adapter (`base_model_relation: adapter`); an export directory (`qlorax
export --merge`, a merged model) becomes another `PublishSource` with relation `merge` and the
same card, staging and upload. The run is read once, as a `FinishedRun` (its results, manifest
and env), checked with publish's own refusals; the card and the tags read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorax import layout
from qlorax.analysis.runs import load_run
from qlorax.analysis.workflow import require_dir
from qlorax.artifacts import read_json
from qlorax.errors import QloraxError
from qlorax.finished_run import FinishedRun
from qlorax.publish.errors import PublishRefused


@dataclass
class PublishSource:
    """What is published: a finished run and what the card says it is."""

    run: FinishedRun
    relation: str  # "adapter" (a run directory) or "merge" (an export directory, later)
    resolved_config: dict[str, Any]

    @property
    def directory(self) -> Path:
        return self.run.run_dir

    @property
    def manifest(self) -> dict[str, Any]:
        return self.run.manifest

    @property
    def results(self) -> dict[str, Any]:
        return self.run.results

    @property
    def env(self) -> dict[str, Any]:
        return self.run.env

    @property
    def adapter_sha256(self) -> str:
        return str(self.run.adapter_sha256 or "")

    @property
    def deterministic_digest(self) -> str:
        return str(self.manifest.get("deterministic_digest", ""))


def checked_run(run_dir: Path) -> PublishSource:
    """The run directory, re-checked against its manifest first; PublishRefused naming what fails."""
    run_dir = require_dir(run_dir)
    facts = load_run(run_dir, run_dir.name)
    integrity = facts.integrity
    if not integrity["has_manifest"]:
        raise QloraxError(f"{run_dir}: no {layout.MANIFEST}; only a finished run directory can be published.")
    if not integrity["intact"]:
        found = [f"{kind} {', '.join(integrity[kind])}" for kind in ("altered", "missing", "extra")
                 if integrity[kind]] + list(integrity.get("manifest_errors") or [])
        raise PublishRefused(f"{run_dir}: refusing to publish: the run does not match its manifest "
                             f"({'; '.join(found)}). Run `qlorax check {run_dir}` for details.")
    if layout.ADAPTER_WEIGHTS not in (facts.manifest or {}).get("files", {}):
        raise QloraxError(f"{run_dir}: the manifest lists no {layout.ADAPTER_WEIGHTS}; nothing to publish.")
    return PublishSource(FinishedRun.from_facts(facts), "adapter", read_json(run_dir / layout.RESOLVED_CONFIG))
