"""`qlorax publish` against the real huggingface_hub client and a local stand-in for the Hub
(tests/hub_standin.py: the endpoints the client calls for create_repo, create_branch,
create_commit and snapshot_download). One verification of the tiny config (2 runs, 2 steps),
shared with tests/test_mlflow.py, serves every test of this module."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BackgroundCli, assert_no_traceback, run_cli
from hub_standin import HubStandIn
from qlorax import layout
from qlorax.artifacts import check_run_dir, read_json
from qlorax.errors import QloraxError
from qlorax.publish.card import base_model_hub_id
from qlorax.publish.errors import PublishRefused
from qlorax.publish.evidence import load_evidence
from qlorax.publish.hub import check_repo_id
from qlorax.publish.source import checked_run

TOKEN = "hf_" + secrets.token_hex(20)
REPO = "tester/tiny-adapter"


@pytest.fixture(scope="module")
def verified(tiny_verification: tuple[Path, BackgroundCli],
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared verification (2 runs in fresh processes; the run is run-01) and a token file."""
    out, command = tiny_verification
    result = command.result()
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path_factory.mktemp("publish")
    token_file = root / "hub-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    return {"root": root, "run": out / "run-01", "report": out / layout.REPORT_JSON, "token": token_file}


@pytest.fixture(scope="module")
def hub() -> HubStandIn:
    server = HubStandIn(TOKEN).start()
    yield server
    server.stop()


def _env(verified: dict[str, Path]) -> dict[str, str]:
    # The client must talk to the stand-in (never the real Hub) and keep its cache in the test's folder.
    return {"HF_HUB_OFFLINE": "0", "HF_HOME": str(verified["root"] / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}


def _publish(verified: dict[str, Path], hub: HubStandIn, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("publish", str(verified["run"]), "--repo-id", REPO, "--token-file", str(verified["token"]),
                   "--endpoint", hub.url, *args, env=_env(verified), timeout=300)


def _download(verified: dict[str, Path], hub: HubStandIn, target: Path, revision: str = "main") -> None:
    """snapshot_download of the published repository, in a fresh interpreter like a user's."""
    code = ("import sys; from huggingface_hub import snapshot_download; "
            "snapshot_download(sys.argv[1], endpoint=sys.argv[2], local_dir=sys.argv[3], revision=sys.argv[4])")
    result = subprocess.run([sys.executable, "-c", code, REPO, hub.url, str(target), revision], capture_output=True,
                            text=True, timeout=120, env={**os.environ, **_env(verified)})
    assert result.returncode == 0, result.stderr[-3000:]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _assert_token_nowhere(verified: dict[str, Path], *texts: str) -> None:
    """Not in any output, nor in any file of the test's folder or the verification (audit log included)."""
    for text in texts:
        assert TOKEN not in text
    for root in (verified["root"], verified["run"].parent):
        for path in root.rglob("*"):
            if path.is_file() and path.name != "hub-token":
                assert TOKEN.encode() not in path.read_bytes(), path


def test_unverified_run_is_refused(verified: dict[str, Path], hub: HubStandIn) -> None:
    result = _publish(verified, hub)
    assert result.returncode == 2, result.stderr
    assert_no_traceback(result)
    assert "refusing to publish an unverified run" in result.stderr and "--allow-unverified" in result.stderr
    assert REPO not in hub.repos  # refused before anything reached the Hub


def _tampered_report(verified: dict[str, Path], path: Path, tamper: str) -> tuple[Path, str]:
    """A copy of the real report changed the way a report of another run would differ."""
    report = read_json(verified["report"])
    metrics = report["overall_analysis"]["metrics_reproducibility"]
    if tamper == "another adapter":
        agreement = report["overall_analysis"]["artifact_agreement"][layout.ADAPTER_WEIGHTS]
        agreement["digests"] = {"0" * 64: list(next(iter(agreement["digests"].values())))}
        expected = "it verified adapter 0000000000000000"
    elif tamper == "another run":
        metrics["reference_digest"] = "f" * 64
        expected = "it verified deterministic digest ffffffffffffffff"
    elif tamper == "score below 1":
        metrics["reproducibility_score"] = 0.5
        expected = "its reproducibility score is 0.500"
    else:
        report["analysis_metadata"]["total_runs_analyzed"] = 1
        expected = "it analysed 1 run"
    path.write_text(json.dumps(report))
    return path, expected


def test_a_report_for_another_adapter_is_refused(verified: dict[str, Path], hub: HubStandIn, tmp_path: Path) -> None:
    path, expected = _tampered_report(verified, tmp_path / "report.json", "another adapter")
    result = _publish(verified, hub, "--report", str(path))
    assert result.returncode == 1, result.stderr
    assert_no_traceback(result)
    assert expected in " ".join(result.stderr.split())
    assert REPO not in hub.repos  # refused before anything reached the Hub


@pytest.mark.parametrize("tamper", ["another run", "score below 1", "one run"])
def test_a_report_that_does_not_prove_this_run_is_refused(verified: dict[str, Path], tmp_path: Path,
                                                          tamper: str) -> None:
    path, expected = _tampered_report(verified, tmp_path / "report.json", tamper)
    source = checked_run(verified["run"])
    with pytest.raises(PublishRefused) as refused:
        load_evidence(path, source, allow_unverified=True)  # a report given is judged even so
    assert refused.value.exit_code == 1 and expected in refused.value.message


def test_a_run_that_fails_its_manifest_check_is_refused(verified: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(verified["run"], run, ignore=shutil.ignore_patterns(layout.CHECKPOINTS_DIR))
    (run / layout.SAMPLES).write_text("edited\n")
    with pytest.raises(PublishRefused) as refused:
        checked_run(run)
    assert "does not match its manifest" in refused.value.message and layout.SAMPLES in refused.value.message


def test_publish_uploads_a_snapshot_that_checks(verified: dict[str, Path], hub: HubStandIn) -> None:
    run = verified["run"]
    manifest = read_json(run / layout.MANIFEST)
    results = read_json(run / layout.RESULTS)
    result = _publish(verified, hub, "--report", str(verified["report"]), "--license", "apache-2.0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_traceback(result)

    # What arrived: the run's files minus the withheld informational ones, plus the card, report, record.
    arrived = hub.files(REPO)
    expected = ({*manifest["files"], layout.MANIFEST} - set(layout.WITHHELD_FROM_PUBLICATION)) | {
        layout.MODEL_CARD, layout.PUBLISHED_REPORT, layout.PUBLICATION, ".gitattributes"}
    assert set(arrived) == expected
    for rel in manifest["files"]:
        if rel not in layout.WITHHELD_FROM_PUBLICATION:
            assert _sha256(arrived[rel]) == manifest["files"][rel]["sha256"], rel
    assert arrived[layout.PUBLISHED_REPORT] == verified["report"].read_bytes()
    assert all(authorized for method, _, authorized in hub.requests if method == "POST")

    # The commit id the Hub returned is in the audit log, and is the branch head.
    events = [json.loads(line) for line in (run.parent / layout.AUDIT_LOG).read_text().splitlines()]
    publish = [e for e in events if e["event_type"] == "publish"][-1]
    assert publish["commit"] == hub.repos[REPO].branches["main"]
    assert publish["commit"] in result.stdout
    assert publish["verified"] is True and publish["adapter_sha256"] == manifest["files"][layout.ADAPTER_WEIGHTS][
        "sha256"]

    # A user's download checks, and its card parses back with the metadata we wrote.
    snapshot = verified["root"] / "snapshot"
    _download(verified, hub, snapshot)
    check = run_cli("check", str(snapshot))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "intact" in check.stdout and "published snapshot" in check.stdout
    from huggingface_hub import ModelCard

    card = ModelCard.load(snapshot / layout.MODEL_CARD)
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["base_model_relation"] == "adapter"
    assert data["license"] == "apache-2.0" and data["pipeline_tag"] == "text-generation"
    assert {"qlorax", "lora", "verified"} <= set(data["tags"])
    assert "base_model" not in data  # the tiny preset is built locally: it has no hub id
    metrics = {m["type"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert metrics["loss"] == pytest.approx(results["eval_loss"], abs=1e-6)
    assert data["qlorax"]["adapter_sha256"] == manifest["files"][layout.ADAPTER_WEIGHTS]["sha256"]
    assert data["qlorax"]["verification_runs"] == 2 and data["qlorax"]["reproducibility_score"] == 1.0
    text = " ".join(card.text.split())
    assert "## Reproducibility" in card.text
    for fact in (results["config_hash"], results["data"]["sha256"], results["base_model"]["digest"],
                 manifest["deterministic_digest"], "qlorax check snapshot", "qlorax verify --config config.yaml",
                 "score 1.000 over 2 runs", "| threads verified | 1 |", "| profiles verified | strict |"):
        assert fact in text, fact

    # A snapshot is still checked for real: an altered byte or a stray file fails.
    adapter = snapshot / layout.ADAPTER_WEIGHTS
    original = adapter.read_bytes()
    adapter.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert check_run_dir(snapshot).altered == [layout.ADAPTER_WEIGHTS]
    adapter.write_bytes(original)
    (snapshot / "notes.txt").write_text("added later\n")
    assert check_run_dir(snapshot).extra == ["notes.txt"]
    (snapshot / "notes.txt").unlink()
    assert check_run_dir(snapshot).intact
    record_path = snapshot / layout.PUBLICATION
    record = json.loads(record_path.read_text())
    record["withheld"][layout.ADAPTER_WEIGHTS] = "a record may withhold informational files only"
    record_path.write_text(json.dumps(record))
    adapter.unlink()
    integrity = check_run_dir(snapshot)
    assert not integrity.intact and integrity.missing == [layout.ADAPTER_WEIGHTS]
    assert "not an informational file" in integrity.publication_problems[0]

    _assert_token_nowhere(verified, result.stdout, result.stderr, check.stdout)
    assert not any(TOKEN.encode() in content for content in arrived.values())


def test_unverified_publish_to_a_branch_replaces_stale_files(verified: dict[str, Path], hub: HubStandIn) -> None:
    """--allow-unverified on a new branch (created from main, which holds the verified snapshot):
    the report it no longer has is deleted in the commit, so the branch still checks."""
    if REPO not in hub.repos:
        pytest.skip("needs the repository test_publish_uploads_a_snapshot_that_checks created")
    result = _publish(verified, hub, "--allow-unverified", "--revision", "experiment")
    assert result.returncode == 0, result.stderr[-3000:]
    branch = hub.files(REPO, "experiment")
    assert layout.PUBLISHED_REPORT not in branch and layout.PUBLISHED_REPORT in hub.files(REPO, "main")
    assert json.loads(branch[layout.PUBLICATION])["verified"] is False
    snapshot = verified["root"] / "snapshot-experiment"
    _download(verified, hub, snapshot, revision="experiment")
    assert check_run_dir(snapshot).intact
    assert "unverified" in snapshot.joinpath(layout.MODEL_CARD).read_text()
    _assert_token_nowhere(verified, result.stdout, result.stderr)


def test_a_repo_id_must_be_owner_slash_name() -> None:
    check_repo_id("tester/tiny-adapter.v2")
    for bad in ("tiny", "a/b/c", "/name", "owner/", "owner/na me"):
        with pytest.raises(QloraxError, match="expected OWNER/NAME"):
            check_repo_id(bad)


def test_base_model_hub_id_comes_from_the_recorded_origin_or_the_configured_hub_id() -> None:
    smollm2 = {"base_model": {"id": "qlorax/smollm2-135m-instruct",
                              "provenance": {"origin": "HuggingFaceTB/SmolLM2-135M-Instruct"}}}
    assert base_model_hub_id(smollm2, {}) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_hub_id({"base_model": {"id": "qlorax/tiny-llama"}},
                             {"config": {"model": {"name_or_path": "qlorax/tiny-llama"}}}) is None
    hub_model = {"base_model": {"id": "org/model-1b"}}
    assert base_model_hub_id(hub_model, {"config": {"model": {"name_or_path": "org/model-1b"}}}) == "org/model-1b"
    assert base_model_hub_id({"base_model": {"id": "local-sha256:0123456789abcdef"}},
                             {"config": {"model": {"name_or_path": "sha256:0123"}}}) is None
