"""The audit trail: a hash chain that names every edited, deleted, inserted or reordered line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlorax.artifacts import canonical_json
from qlorax.ops.audit import GENESIS_HASH, AuditLogError, AuditLogger, event_hash, verify_log


@pytest.fixture
def audit_log(tmp_path: Path, synthetic_run) -> Path:
    """A log with the guide's events (start, complete, verification, gates) plus two notes."""
    run = synthetic_run("run")
    manifest = json.loads((run / "artifact_summary.json").read_text())
    path = tmp_path / "audit" / "audit.log"
    log = AuditLogger(path, environment="native", user="ci")
    log.log_training_start({"training": {"seed": 42}}, "c" * 64, run)
    log.log_training_complete({"final_train_loss": 3.1}, manifest, run)
    log.log_verification({"reproducibility_score": 1.0, "runs": 2})
    log.log_event("note", text="first")
    log.log_event("note", text="second")
    log.log_gates(True, [])
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_events_are_chained_and_complete(audit_log: Path) -> None:
    events = [json.loads(line) for line in _lines(audit_log)]
    assert [e["event_type"] for e in events] == [
        "training_start",
        "training_complete",
        "verification",
        "note",
        "note",
        "gates",
    ]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[0]["prev_hash"] == GENESIS_HASH
    for previous, event in zip(events, events[1:], strict=False):
        assert event["prev_hash"] == previous["event_hash"]
    for event in events:
        assert event["event_hash"] == event_hash(event)
        assert {"user", "environment", "timestamp", "host", "qlorax_version"} <= event.keys()
        assert event["user"] == "ci" and event["environment"] == "native"
    assert events[0]["config_hash"] == "c" * 64
    assert (
        events[1]["artifacts"]["files"]["adapter_model.safetensors"]
        == json.loads((audit_log.parent.parent / "run" / "artifact_summary.json").read_text())["files"][
            "adapter_model.safetensors"
        ]["sha256"]
    )
    head = json.loads(Path(str(audit_log) + ".head").read_text())
    assert head["seq"] == 6 and head["event_hash"] == events[-1]["event_hash"]


def test_untouched_log_verifies(audit_log: Path, cli) -> None:
    result = cli("audit", "verify", audit_log)
    assert result.exit_code == 0, result.stderr
    assert "OK, 6 events" in result.stdout


def _tamper(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize(
    "change, expected",
    [
        ("edited", "line 3: edited"),
        ("deleted", "line 3: deleted"),
        ("inserted", "line 4: inserted"),
        ("swapped", "lines 3 and 4: reordered"),
        ("deleted_last", "line 6: deleted"),
        ("edited_rehashed", "line 2: edited"),
    ],
)
def test_tampering_is_detected_and_named(audit_log: Path, cli, change: str, expected: str) -> None:
    lines = _lines(audit_log)
    if change == "edited":
        lines[2] = lines[2].replace('"reproducibility_score":1.0', '"reproducibility_score":0.5')
        assert lines[2] != _lines(audit_log)[2]
    elif change == "deleted":
        del lines[2]
    elif change == "inserted":
        lines.insert(3, lines[1])  # a replayed event
    elif change == "swapped":
        lines[2], lines[3] = lines[3], lines[2]
    elif change == "deleted_last":
        del lines[-1]
    elif change == "edited_rehashed":  # edit and recompute the line's own hash: the next link breaks
        event = json.loads(lines[1])
        event["results"]["final_train_loss"] = 0.1
        event["event_hash"] = event_hash(event)
        lines[1] = canonical_json(event) + "\n"
    _tamper(audit_log, lines)
    result = cli("audit", "verify", audit_log)
    assert result.exit_code == 1
    assert expected in result.stderr, result.stderr
    ok, problems = verify_log(audit_log)
    assert not ok and any(p.startswith(expected) for p in problems), problems


def test_verify_json_output_and_missing_log(audit_log: Path, cli, tmp_path: Path) -> None:
    result = cli("audit", "verify", audit_log, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["events"] == 6 and report["head"]["seq"] == 6
    missing = cli("audit", "verify", tmp_path / "nope.log")
    assert missing.exit_code == 2 and "not found" in missing.stderr


def test_appending_onto_a_damaged_tail_is_refused(audit_log: Path) -> None:
    lines = _lines(audit_log)
    _tamper(audit_log, lines[:-1] + [lines[-1].replace('"passed":true', '"passed":false')])
    with pytest.raises(AuditLogError, match="refusing to append"):
        AuditLogger(audit_log, environment="native").log_event("note")


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "shared.log"
    script = (
        "import sys\nfrom qlorax.ops.audit import AuditLogger\n"
        "log = AuditLogger(sys.argv[1], environment='native')\n"
        "for i in range(25):\n    log.log_event('note', writer=sys.argv[2], i=i)\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, str(path), str(n)]) for n in range(3)]
    assert [w.wait(120) for w in writers] == [0, 0, 0]
    assert verify_log(path) == (True, [])
    events = [json.loads(line) for line in _lines(path)]
    assert len(events) == 75 and [e["seq"] for e in events] == list(range(1, 76))
