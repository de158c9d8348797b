"""Hardening, tampering: a run directory's files must be its own regular files. A symlink to an
identical copy (through which the content can change later), a linked folder, a hard link, a
FIFO -- each is reported as tampering by `check`, `analyze` and the cache, naming the file.
And the audit log names a forged line inserted with correctly computed hashes."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

from conftest import assert_no_traceback, run_cli
from qlorax.analysis import verify_run_dir
from qlorax.layout import MANIFEST
from synthetic_runs import make_run

RUN_FILES = (
    "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
    "training_args.json", "resolved_config.json", "results.json", "trace.jsonl", "env.json",
    "training_metadata.json", "train.log", MANIFEST,
)


def link_to_identical_copy(run: Path, name: str, elsewhere: Path) -> None:
    elsewhere.mkdir(parents=True, exist_ok=True)
    copy = elsewhere / name.replace("/", "_")
    shutil.copyfile(run / name, copy)
    (run / name).unlink()
    (run / name).symlink_to(copy)


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_symlink_to_an_identical_copy_is_tampering(tmp_path: Path, name: str) -> None:
    run = make_run(tmp_path, "run")
    link_to_identical_copy(run, name, tmp_path / "elsewhere")
    result = verify_run_dir(run)
    assert not result["intact"]
    assert result["irregular"] == [f"{name} (symbolic link)"]


@pytest.mark.parametrize("kind", ["linked folder", "fifo", "hard link", "link in checkpoints", "dangling link"])
def test_other_entries_that_are_not_the_runs_own_files(tmp_path: Path, kind: str) -> None:
    run = make_run(tmp_path, "run")
    if kind == "linked folder":
        shutil.move(run / "checkpoints", tmp_path / "checkpoints")
        (run / "checkpoints").symlink_to(tmp_path / "checkpoints")
        expected = "checkpoints (symbolic link)"
    elif kind == "fifo":
        os.mkfifo(run / "results.json.pipe")
        expected = "results.json.pipe (not a regular file)"
    elif kind == "hard link":
        os.link(run / "adapter_model.safetensors", tmp_path / "outside.safetensors")
        expected = "adapter_model.safetensors (hard link: 2 names)"
    elif kind == "link in checkpoints":
        (run / "checkpoints" / "step-00000004" / "state.safetensors").symlink_to(tmp_path / "anything")
        expected = "checkpoints/step-00000004/state.safetensors (symbolic link)"
    else:
        (run / "extra.json").symlink_to(tmp_path / "missing.json")
        expected = "extra.json (symbolic link)"
    result = verify_run_dir(run)
    assert expected in result["irregular"] and not result["intact"]


def test_check_and_analyze_name_the_linked_file(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    good = make_run(runs, "good")
    linked = make_run(runs, "linked")
    link_to_identical_copy(linked, "adapter_model.safetensors", tmp_path / "elsewhere")

    check = run_cli("check", str(linked), env={"COLUMNS": "200"})
    assert check.returncode == 1
    assert_no_traceback(check)
    assert "tampered (not a regular file of the run): adapter_model.safetensors (symbolic link)" in check.stdout
    assert run_cli("check", str(good)).returncode == 0

    from qlorax.analysis.workflow import run_analyze
    from qlorax.layout import REPORT_RUNS, REPORT_SCORE, report_get

    report, _files = run_analyze([runs], tmp_path / "report")
    assert report_get(report, REPORT_SCORE) == 0.5
    entry = next(r for r in report_get(report, REPORT_RUNS) if r["name"] == "linked")
    assert entry["status"] == "manifest_mismatch"
    assert "adapter_model.safetensors (symbolic link)" in json.dumps(entry)


def test_the_cache_refuses_and_drops_entries_with_links(tmp_path: Path) -> None:
    from qlorax.errors import OutputError
    from qlorax.ops.cache import CacheCorruptionWarning, CacheManager

    cache = CacheManager(tmp_path / "cache")
    key = cache.key_for("c" * 64, {"train": "d" * 64}, "m" * 64, "0.1.0", "strict")
    run = make_run(tmp_path, "run")
    stored = cache.store(key, run)
    assert cache.lookup(key) == stored
    link_to_identical_copy(stored, "results.json", tmp_path / "elsewhere")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.lookup(key) is None
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheCorruptionWarning)]
    assert messages and "results.json (symbolic link)" in messages[0]
    assert not stored.exists()

    linked_run = make_run(tmp_path, "linked")
    link_to_identical_copy(linked_run, "trace.jsonl", tmp_path / "elsewhere2")
    with pytest.raises(OutputError, match=r"trace.jsonl \(symbolic link\)"):
        cache.store(key, linked_run)


# -- audit: a forged line with correctly computed hashes --------------------------------------
def _forged_after(lines: list[str], after: int) -> str:
    """An event that claims to follow line `after` (1-based), with seq, prev_hash and
    event_hash all computed correctly."""
    from qlorax.artifacts import canonical_json
    from qlorax.ops.audit import event_hash

    previous = json.loads(lines[after - 1])
    event = {k: v for k, v in previous.items() if k != "event_hash"}
    event.update(seq=previous["seq"] + 1, prev_hash=previous["event_hash"], event_type="training_complete")
    event["event_hash"] = event_hash(event)
    return canonical_json(event)


@pytest.fixture
def audit_lines(tmp_path: Path) -> tuple[Path, list[str]]:
    from qlorax.ops.audit import AuditLogger

    log = tmp_path / "audit.jsonl"
    logger = AuditLogger(log)
    for index in range(5):
        logger.log_event("note", index=index)
    return log, log.read_text().splitlines()


@pytest.mark.parametrize("after", [1, 2, 4])
def test_a_forged_inserted_line_is_named_not_the_line_after_it(audit_lines: tuple[Path, list[str]],
                                                              after: int) -> None:
    from qlorax.ops.audit import verify_log

    log, lines = audit_lines
    log.write_text("\n".join([*lines[:after], _forged_after(lines, after), *lines[after:]]) + "\n")
    ok, problems = verify_log(log)
    assert not ok
    assert problems == [f"line {after + 1}: inserted: seq {after + 1} is a forged event (correct hashes) that is "
                        f"not part of the chain (line {after} and line {after + 2} link directly)"]


def test_a_forged_line_before_the_first_and_after_the_last(audit_lines: tuple[Path, list[str]]) -> None:
    from qlorax.artifacts import canonical_json
    from qlorax.ops.audit import GENESIS_HASH, event_hash, verify_log

    log, lines = audit_lines
    first = {k: v for k, v in json.loads(lines[0]).items() if k != "event_hash"}
    first.update(prev_hash=GENESIS_HASH, event_type="forged")
    first["event_hash"] = event_hash(first)
    log.write_text("\n".join([canonical_json(first), *lines]) + "\n")
    assert verify_log(log)[1][0].startswith("line 1: inserted:")
    log.write_text("\n".join([*lines, _forged_after(lines, 5)]) + "\n")
    assert verify_log(log)[1] == ["line 6: appended outside qlorax (or the head update was interrupted): the log "
                                  "ends at seq 6, the head anchor records seq 5"]
    log.write_text("\n".join([*lines[:2], lines[1], *lines[2:]]) + "\n")
    assert verify_log(log)[1] == ["line 3: inserted: seq 2 (note) is a copy of line 2"]
