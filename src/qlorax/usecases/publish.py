"""Use case `publish`: a checked, verified run to one publish target, recorded in the audit log.

The same steps for every target (qlorax.publish.TARGETS): check the options, register the
secrets, re-check the run, read the report's proof, write the card, stage and check the
snapshot, hand it to the target, audit what it did. Exit codes: 0 published; 1 the run fails
its manifest check or the report does not prove it; 2 bad input (no report without
--allow-unverified, a bad repo id, a refused token); 3 the server cannot be reached or refused.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qlorax import publish
from qlorax.layout import AUDIT_LOG
from qlorax.ops.audit import AuditLogger
from qlorax.publish.card import model_card
from qlorax.publish.evidence import Evidence, load_evidence
from qlorax.publish.snapshot import stage_snapshot
from qlorax.publish.source import PublishSource, checked_run
from qlorax.publish.target import Published, PublishRequest, Snapshot


@dataclass
class PublishOutcome:
    """What was published and what the target answered, for the command to show."""

    source: PublishSource
    evidence: Evidence
    files: dict[str, str]
    published: Published


def _register_secrets(request: PublishRequest) -> PublishRequest:
    """Read the token and take the password out of the MLflow URI before anything can print them
    (both are registered as secrets, scrubbed from every message from now on)."""
    token = None
    if request.token_file is not None:
        from qlorax.ops.secrets import read_token_file

        token = read_token_file(request.token_file)
    if request.mlflow_uri:
        from qlorax.tracking import split_credentials

        split_credentials(request.mlflow_uri)
    return dataclasses.replace(request, token=token)


def publish_run(request: PublishRequest) -> PublishOutcome:
    """Publish `request.run_dir` to `request.to`; raises QloraxError (with its exit code) when refused."""
    target = publish.target(request.to)
    target.check(request)
    request = _register_secrets(request)
    source = checked_run(request.run_dir)
    evidence = load_evidence(request.report, source, request.allow_unverified)
    name, registered = target.card_names(request)
    card = model_card(source, evidence, name, license_id=request.license_id, datasets=request.datasets,
                      registered_model=registered)
    run_dir = Path(request.run_dir)
    audit = AuditLogger(request.audit_log or run_dir.resolve().parent / AUDIT_LOG)
    with tempfile.TemporaryDirectory(prefix="qlorax-publish-") as staging:
        files = stage_snapshot(source, evidence, str(card), Path(staging))
        snapshot = Snapshot(Path(staging), files, source, evidence, name, registered)
        published = target.publish(snapshot, request)
        audit.log_event("publish", target=target.audit_name, **published.audit, files=files,
                        run_dir=str(request.run_dir), deterministic_digest=source.deterministic_digest,
                        adapter_sha256=source.adapter_sha256, verified=evidence.verified,
                        report=str(evidence.report_path) if evidence.report_path else None)
    return PublishOutcome(source, evidence, files, published)
