"""The one interface every publish target implements, and what passes through it.

A target (`hub`, `mlflow`) is one module holding a `TARGET` object with the `PublishTarget`
methods; `qlorax.publish.TARGETS` names them. The workflow (`qlorax.usecases.publish`) checks,
stages and audits the same way for every target; only `check`, `card_names` and `publish` differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qlorax.publish.evidence import Evidence
from qlorax.publish.source import PublishSource


@dataclass
class PublishRequest:
    """What `qlorax publish` was asked: the run, the target, and the options of every target."""

    run_dir: Path
    to: str = "hub"
    repo_id: str | None = None
    token_file: Path | None = None
    private: bool = False
    revision: str | None = None
    endpoint: str | None = None
    report: Path | None = None
    allow_unverified: bool = False
    mlflow_uri: str | None = None
    model_name: str | None = None
    license_id: str | None = None
    datasets: list[str] | None = None
    audit_log: Path | None = None
    token: str | None = None  # read from token_file by the workflow (registered as a secret first)


@dataclass
class Snapshot:
    """A staged snapshot, checked as `qlorax check` will check a download of it."""

    directory: Path
    files: dict[str, str]  # path in the snapshot -> sha256
    source: PublishSource
    evidence: Evidence
    name: str  # the OWNER/NAME the card calls it
    registered_model: str | None = None  # the registry's name for it, for a model registry


@dataclass
class Published:
    """What a target did: the rows the command shows, and the fields of the audit event."""

    rows: list[tuple[str, str]]
    audit: dict[str, Any] = field(default_factory=dict)


class PublishTarget(Protocol):
    """Where a snapshot can go; one module per target, one entry in `qlorax.publish.TARGETS`."""

    audit_name: str  # the audit event's `target`

    def check(self, request: PublishRequest) -> None:
        """Refuse missing or malformed options (exit 2) before anything is read or sent."""

    def card_names(self, request: PublishRequest) -> tuple[str, str | None]:
        """(the OWNER/NAME on the card, the registered model's name or None)."""

    def publish(self, snapshot: Snapshot, request: PublishRequest) -> Published:
        """Upload or register the staged snapshot; PublishError (exit 3) when refused."""
