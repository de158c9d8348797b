"""Experiment tracking against a real `mlflow server` (sqlite backend, 127.0.0.1, a free port):
`train --mlflow-uri` logs params, the loss history, digest tags and the run's files;
`publish --to mlflow` registers a model version tagged with the adapter digest. The URI carries
credentials, which must appear in no output or file. One server and one tiny run (2 steps) for the
module; the server boots while the run trains and the verification shared with tests/test_publish.py
runs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, BackgroundCli, assert_no_traceback, run_cli
from qlorax import layout
from qlorax.artifacts import read_json
from qlorax.tracking import flatten

PASSWORD = "mlflow-pw-7f3a9c21e5"
MODEL = "tiny-adapter"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer within {timeout} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def tracked(tiny_verification: tuple[Path, BackgroundCli],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    with open(log, "wb") as handle:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        uri = f"http://qlorax:{PASSWORD}@127.0.0.1:{port}"
        # The run trains while the server boots; if it finishes first, mlflow's client retries (backoff
        # factor 1: after 1, 2, 4, 8, ... s) until the server answers.
        train = BackgroundCli("train", "--config", str(TINY_CONFIG), "--set", "training.max_steps=2", "--set",
                              "training.sample_max_new_tokens=2", "--threads", "1", "--output-dir",
                              str(root / "runs" / "run"), "--mlflow-uri", uri,
                              env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"})
        _wait_healthy(url, server, log)
        trained = train.result(timeout=600)
        assert trained.returncode == 0, trained.stderr[-3000:]
        stdout, stderr = trained.stdout, trained.stderr
        verification = tiny_verification[1].result()
        assert verification.returncode == 0, verification.stderr[-3000:]
        yield {"root": root, "url": url, "uri": uri, "run": root / "runs" / "run", "output": stdout + stderr,
               "verified_run": tiny_verification[0] / "run-01",
               "report": tiny_verification[0] / layout.REPORT_JSON}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _client(tracked: dict[str, object]):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=str(tracked["url"]), registry_uri=str(tracked["url"]))


def _training_run(tracked: dict[str, object]):
    client = _client(tracked)
    experiment = client.get_experiment_by_name("qlorax")
    runs = client.search_runs([experiment.experiment_id], "tags.`qlorax.kind` = 'training'")
    assert len(runs) == 1
    return client, runs[0]


def _assert_password_nowhere(root: Path, *texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text
    for path in root.rglob("*"):
        if path.is_file():  # the server's database and artifact store included
            assert PASSWORD.encode() not in path.read_bytes(), path


def test_train_logs_params_metrics_tags_and_artifacts(tracked: dict[str, object]) -> None:
    run_dir = Path(tracked["run"])
    client, run = _training_run(tracked)
    assert run.info.status == "FINISHED"

    resolved = read_json(run_dir / layout.RESOLVED_CONFIG)
    assert run.data.params == flatten(resolved["config"])
    assert run.data.params["training.max_steps"] == "2"

    trace = [json.loads(line) for line in (run_dir / layout.TRACE).read_text().splitlines()]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (r["step"], r["loss"]) for r in trace]
    results = read_json(run_dir / layout.RESULTS)
    assert run.data.metrics["eval_loss"] == results["eval_loss"]

    manifest = read_json(run_dir / layout.MANIFEST)
    adapter_sha = manifest["files"][layout.ADAPTER_WEIGHTS]["sha256"]
    tags = run.data.tags
    assert tags["qlorax.config_hash"] == resolved["config_hash"] == results["config_hash"]
    assert tags["qlorax.adapter_sha256"] == adapter_sha
    assert tags["qlorax.deterministic_digest"] == manifest["deterministic_digest"]
    assert tags["qlorax.data_sha256"] == results["data"]["sha256"]
    assert tags["qlorax.base_model_digest"] == results["base_model"]["digest"]

    logged = {a.path for a in client.list_artifacts(run.info.run_id, "run")}
    assert logged == {f"run/{rel}" for rel in [*manifest["files"], layout.MANIFEST]}
    local = client.download_artifacts(run.info.run_id, f"run/{layout.ADAPTER_WEIGHTS}", str(tracked["root"]))
    assert hashlib.sha256(Path(local).read_bytes()).hexdigest() == adapter_sha

    assert "MLflow: logged 1 run(s)" in str(tracked["output"])
    _assert_password_nowhere(Path(tracked["root"]), str(tracked["output"]))


def test_publish_to_mlflow_registers_a_version_with_the_digests(tracked: dict[str, object]) -> None:
    """The verified run-01 of the shared verification, registered with its report; its bits equal the
    tracked training run's (same config, same machine), so the version links to that run."""
    run_dir = Path(tracked["verified_run"])
    result = run_cli("publish", str(run_dir), "--to", "mlflow", "--mlflow-uri", str(tracked["uri"]),
                     "--model-name", MODEL, "--report", str(tracked["report"]), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_traceback(result)
    client, training = _training_run(tracked)
    version = client.get_model_version(MODEL, "1")
    manifest = read_json(run_dir / layout.MANIFEST)
    assert version.tags["qlorax.adapter_sha256"] == manifest["files"][layout.ADAPTER_WEIGHTS]["sha256"]
    assert version.tags["qlorax.deterministic_digest"] == manifest["deterministic_digest"]
    assert version.tags["qlorax.verified"] == "true"
    assert version.tags["qlorax.training_run_id"] == training.info.run_id
    files = {a.path for a in client.list_artifacts(version.run_id, "model")}
    assert {f"model/{layout.ADAPTER_WEIGHTS}", f"model/{layout.MODEL_CARD}", f"model/{layout.PUBLICATION}",
            "model/verification"} <= files

    events = [json.loads(line) for line in (run_dir.parent / layout.AUDIT_LOG).read_text().splitlines()]
    publish = [e for e in events if e["event_type"] == "publish" and e["target"] == "mlflow"][-1]
    assert publish["model_version"] == version.version and publish["verified"] is True
    _assert_password_nowhere(Path(tracked["root"]), result.stdout, result.stderr)
    _assert_password_nowhere(run_dir.parent)


def test_a_verification_is_a_parent_run_over_its_runs(tracked: dict[str, object]) -> None:
    """What `verify --mlflow-uri` logs (log_runs with the report), against the same server: the score
    on a parent run, each run nested under it, a failed run as FAILED."""
    from qlorax.analysis.workflow import run_analyze
    from qlorax.tracking import log_runs

    run_dir = Path(tracked["run"])
    report, files = run_analyze([run_dir], Path(tracked["root"]) / "analysis")
    parent_id, ok_id, failed_id = log_runs(str(tracked["uri"]), [run_dir, run_dir], [0, 1], report, files["json"])
    client = _client(tracked)
    parent = client.get_run(parent_id)
    assert parent.data.metrics["reproducibility_score"] == 1.0
    assert parent.data.tags["qlorax.kind"] == "verification"
    assert {a.path for a in client.list_artifacts(parent_id)} == {layout.REPORT_JSON}
    ok, failed = client.get_run(ok_id), client.get_run(failed_id)
    assert ok.data.tags["mlflow.parentRunId"] == failed.data.tags["mlflow.parentRunId"] == parent_id
    assert ok.info.status == "FINISHED" and ok.data.params == flatten(read_json(run_dir / layout.RESOLVED_CONFIG)[
        "config"])
    assert failed.info.status == "FAILED" and failed.data.tags["qlorax.exit_code"] == "1" and not failed.data.params


def test_commands_without_the_option_never_import_mlflow() -> None:
    code = ("import sys; from qlorax import publish, tracking; from qlorax.usecases import runops; import qlorax.cli; "
            "options = runops.RunOptions(); runops.check_tracking(options); runops.record_tracking(options, [], []); "
            "print('mlflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_mlflow_retries_are_bounded_unless_the_user_set_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow's defaults kept an unreachable server busy for ~249 s; while qlorax's client is
    open its retry settings are bounded, a user's own setting wins, and both are put back."""
    from qlorax.tracking import RETRY_DEFAULTS, mlflow_client

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with mlflow_client("http://127.0.0.1:9"):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == RETRY_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
        assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"  # the user's
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
