"""The snapshot every target publishes: the run's files minus the informational ones that hold
local paths, plus the card, the report and a publication record, checked before anything leaves."""

from __future__ import annotations

import shutil
from pathlib import Path

from qlorax import __version__, layout
from qlorax.artifacts import check_run_dir, sha256_file, write_json_atomic, write_text_atomic
from qlorax.publish.errors import PublishRefused
from qlorax.publish.evidence import Evidence
from qlorax.publish.source import PublishSource

WITHHELD_REASON = "informational: holds local paths, the host name and timestamps; not needed by `qlorax check`"


def stage_snapshot(source: PublishSource, evidence: Evidence, card_text: str, staging: Path) -> dict[str, str]:
    """Lay out the snapshot in `staging` and check it as `qlorax check` will check a download of
    it; returns {path in snapshot: sha256}. The run's informational files that hold local paths
    (training_metadata.json, train.log) are withheld; the card, the report and the publication
    record are added."""
    staging = Path(staging)
    withheld = {rel: WITHHELD_REASON for rel in source.manifest["files"] if rel in layout.WITHHELD_FROM_PUBLICATION}
    for rel in [*source.manifest["files"], layout.MANIFEST]:
        if rel in withheld:
            continue
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.directory / rel, target)
    write_text_atomic(staging / layout.MODEL_CARD, card_text)
    added = {layout.MODEL_CARD: sha256_file(staging / layout.MODEL_CARD)}
    if evidence.report_path is not None:
        report = evidence.report_path if evidence.report_path.is_file() else evidence.report_path / layout.REPORT_JSON
        (staging / layout.PUBLISHED_REPORT).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report, staging / layout.PUBLISHED_REPORT)
        added[layout.PUBLISHED_REPORT] = sha256_file(staging / layout.PUBLISHED_REPORT)
    write_json_atomic(staging / layout.PUBLICATION, {
        "format": layout.PUBLICATION_FORMAT,
        "relation": source.relation,
        "manifest_sha256": sha256_file(staging / layout.MANIFEST),
        "deterministic_digest": source.deterministic_digest,
        "adapter_sha256": source.adapter_sha256,
        "verified": evidence.verified,
        "withheld": withheld,
        "added": added,
        "qlorax_version": __version__,
    })
    integrity = check_run_dir(staging)
    if not integrity.intact:  # our own layout failed our own check: a bug, never an upload
        raise PublishRefused(f"the staged snapshot does not pass `qlorax check` ({integrity.to_dict()}); "
                             "nothing was uploaded.")
    return {path.relative_to(staging).as_posix(): sha256_file(path)
            for path in sorted(staging.rglob("*")) if path.is_file()}
