"""qlorax check: one flipped byte anywhere, a missing or an added file, all exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlorax.analysis import verify_run_dir
from qlorax.layout import MANIFEST
from synthetic_runs import flip_byte, make_run

CLI = [sys.executable, "-c", "from qlorax.cli import main; main()"]
RUN_FILES = (
    "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
    "training_args.json", "resolved_config.json", "results.json", "trace.jsonl", "env.json",
    "training_metadata.json", "train.log",
)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path, "run")


def test_synthetic_run_has_every_file(run: Path) -> None:
    manifest = json.loads((run / MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(RUN_FILES)


def test_intact_run_passes(run: Path) -> None:
    proc = cli("check", str(run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "intact (11 files match the manifest)" in proc.stdout
    # checkpoints carry their own manifests and are not covered
    (run / "checkpoints" / "step-00000004" / "optimizer.pt").write_bytes(b"state")
    assert cli("check", str(run)).returncode == 0


@pytest.mark.parametrize("name", RUN_FILES)
def test_one_flipped_byte_in_any_file_fails(run: Path, name: str) -> None:
    flip_byte(run / name)
    proc = cli("check", str(run), "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["altered"] == [name] and not result["intact"]
    assert result["missing"] == [] and result["extra"] == []


def test_flipped_byte_in_the_manifest_fails_via_cli(run: Path) -> None:
    """The manifest itself is what is broken (its files are untouched): the text output says the
    run does not match and prints each of the manifest's errors that --json lists."""
    flip_byte(run / MANIFEST)
    as_json = cli("check", str(run), "--json")
    assert as_json.returncode == 1, as_json.stdout + as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["intact"] is False and result["has_manifest"] is True
    assert result["manifest_errors"] and all(e.startswith(f"{MANIFEST}: ") for e in result["manifest_errors"])
    proc = cli("check", str(run))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == f"{run}: MISMATCH against {MANIFEST}."
    assert [f"manifest: {error}" for error in result["manifest_errors"]] == lines[:-1]
    assert "intact" not in proc.stdout and "Traceback" not in proc.stderr


def test_every_single_byte_flip_of_the_manifest_is_detected(run: Path) -> None:
    path = run / MANIFEST
    original = path.read_bytes()
    undetected = []
    for offset in range(0, len(original), 5):  # every fifth byte keeps it quick
        data = bytearray(original)
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        if verify_run_dir(run)["intact"]:
            undetected.append(offset)
    path.write_bytes(original)
    assert verify_run_dir(run)["intact"]
    assert undetected == []


def test_missing_file_fails(run: Path) -> None:
    (run / "tokenizer.json").unlink()
    proc = cli("check", str(run))
    assert proc.returncode == 1
    assert "missing: tokenizer.json" in proc.stdout


def test_added_file_fails(run: Path) -> None:
    (run / "notes.txt").write_text("edited by hand\n")
    proc = cli("check", str(run), "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["extra"] == ["notes.txt"]
    proc = cli("check", str(run))
    assert "extra (not in manifest): notes.txt" in proc.stdout


def test_no_manifest_fails(tmp_path: Path) -> None:
    run = make_run(tmp_path, "unfinished", manifest=False)
    proc = cli("check", str(run))
    assert proc.returncode == 1
    assert "no artifact_summary.json" in proc.stdout


def test_missing_directory_exits_2(tmp_path: Path) -> None:
    proc = cli("check", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr
