"""Durable run storage on a real S3 server (SeaweedFS on 127.0.0.1, tests/object_store.py).

A run that loses its machine (its processes SIGKILLed, its working directory deleted) is
finished by `qlorax resume s3://...` in a fresh directory with the bits of an uninterrupted
run; a truncated stored checkpoint is named and the previous one used; a missing bucket and
refused credentials are exit 2 without echoing the secret; a store that stops mid-run stops
the run (exit 3) with its checkpoint kept locally, and `resume --storage` finishes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, assert_no_traceback, deterministic_files, run_cli
from object_store import SeaweedS3
from qlorax.artifacts import check_run_dir

# 9 steps, a checkpoint every 3: two stored checkpoints before the last one.
CONFIG = ["--config", str(TINY_CONFIG), "--set", "training.max_steps=9", "--set", "training.sample_max_new_tokens=4",
          "--threads", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli("train", *CONFIG, "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def start_train(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", "from qlorax.cli import main; main()", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **env})


def wait_for_object(server: SeaweedS3, key: str, process: subprocess.Popen[str], timeout: float = 300) -> None:
    """Until `bucket/key` exists on the store (the run's upload of it completed)."""
    from pyarrow import fs

    client = server.filesystem()
    deadline = time.monotonic() + timeout
    while client.get_file_info(key).type != fs.FileType.File:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{key} never appeared on the store"
        time.sleep(0.1)


def test_a_run_that_loses_its_machine_is_finished_elsewhere_from_s3(s3_server: SeaweedS3, uninterrupted: Path,
                                                                     tmp_path: Path) -> None:
    """Killed after its step-6 checkpoint reached S3, working dir deleted; step 6 then truncated
    on the store: resume in a fresh directory names it, continues from step 3, same bits."""
    bucket = s3_server.make_bucket("lost-machine")
    uri = f"s3://{bucket}/runs/one"
    workdir = tmp_path / "machine-a"
    process = start_train(*CONFIG, "--output-dir", str(workdir), "--storage", uri, env=s3_server.env())
    wait_for_object(s3_server, f"{bucket}/runs/one/checkpoints/step-00000006/checkpoint_manifest.json", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    shutil.rmtree(workdir)  # the machine is gone
    client = s3_server.filesystem()
    stored = client.get_file_info(fs_selector(f"{bucket}/runs/one"))
    names = {info.path.split("/runs/one/", 1)[1] for info in stored}
    assert {"checkpoints/config.json", "checkpoints/inputs.json",
            "checkpoints/step-00000003/checkpoint_manifest.json"} <= names, names
    assert "artifact_summary.json" not in names  # not finished: no manifest on storage
    tensors = f"{bucket}/runs/one/checkpoints/step-00000006/state.safetensors"
    with client.open_input_stream(tensors) as handle:
        data = handle.read()
    with client.open_output_stream(tensors) as out:  # a truncated object, as an interrupted upload leaves it
        out.write(data[: len(data) // 2])

    fresh = tmp_path / "machine-b"
    resumed = run_cli("resume", uri, "--output-dir", str(fresh), "--threads", "1", env=s3_server.env())
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_no_traceback(resumed)
    output = " ".join((resumed.stdout + resumed.stderr).split())
    assert "stored checkpoint step-00000006 is incomplete or corrupt" in output, output
    assert "resuming from checkpoint step-00000003" in output, output
    assert deterministic_files(fresh) == deterministic_files(uninterrupted)
    assert check_run_dir(fresh).intact
    checked = run_cli("check", uri, env=s3_server.env())
    assert checked.returncode == 0 and "intact" in checked.stdout, checked.stdout + checked.stderr
    again = run_cli("resume", uri, "--output-dir", str(tmp_path / "machine-c"), env=s3_server.env())
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stdout + again.stderr
    assert deterministic_files(tmp_path / "machine-c") == deterministic_files(uninterrupted)
    for result in (resumed, checked, again):  # the credentials never appear
        assert s3_server.secret_key not in result.stdout + result.stderr
    for path in fresh.rglob("*"):
        if path.is_file():
            assert s3_server.secret_key.encode() not in path.read_bytes(), path


def fs_selector(base: str):  # -> pyarrow.fs.FileSelector
    from pyarrow import fs

    return fs.FileSelector(base, recursive=True)


@pytest.mark.parametrize("problem", ["missing bucket", "wrong secret"])
def test_a_store_that_refuses_is_exit_2_before_anything_is_written(s3_server: SeaweedS3, tmp_path: Path,
                                                                   problem: str) -> None:
    env = s3_server.env()
    uri = "s3://no-such-bucket/run"
    if problem == "wrong secret":
        uri = f"s3://{s3_server.make_bucket('refusing')}/run"
        env["AWS_SECRET_ACCESS_KEY"] = "wrong-" + s3_server.secret_key[::-1]
    run_dir = tmp_path / "run"
    result = run_cli("train", *CONFIG, "--output-dir", str(run_dir), "--storage", uri, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_no_traceback(result)
    expected = "the bucket no-such-bucket does not exist" if problem == "missing bucket" else "refused the credentials"
    assert expected in " ".join(result.stderr.split()), result.stderr
    assert env["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr
    assert not run_dir.exists()


def test_a_store_that_stops_mid_run_stops_the_run_with_its_checkpoint_kept(s3_server: SeaweedS3,
                                                                          uninterrupted: Path,
                                                                          tmp_path: Path) -> None:
    """Documented choice: an upload retried for QLORAX_STORAGE_RETRY_SECONDS, then the run stops
    (exit 3) keeping the checkpoint locally; `resume DIR --storage URI` finishes it and copies it."""
    bucket = s3_server.make_bucket("stopping")
    uri = f"s3://{bucket}/run"
    env = {**s3_server.env(), "QLORAX_STORAGE_RETRY_SECONDS": "4"}
    run_dir = tmp_path / "run"
    process = start_train(*CONFIG, "--output-dir", str(run_dir), "--storage", uri, env=env)
    try:
        wait_for_object(s3_server, f"{bucket}/run/checkpoints/step-00000003/checkpoint_manifest.json", process)
        s3_server.stop(grace=0)  # at once: the run is between its step-3 and step-6 uploads
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        s3_server.start()
    assert process.returncode == 3, stdout + stderr
    message = " ".join(stderr.split())
    assert "the store did not answer for 4 s" in message and f"qlorax resume {run_dir} --storage {uri}" in message
    assert "Traceback" not in stdout + stderr
    assert (run_dir / "checkpoints" / "step-00000006" / "checkpoint_manifest.json").is_file()  # kept locally
    resumed = run_cli("resume", str(run_dir), "--storage", uri, "--threads", "1", env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert deterministic_files(run_dir) == deterministic_files(uninterrupted)
    checked = run_cli("check", uri, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_durable_verification_puts_every_run_on_s3(s3_server: SeaweedS3, tmp_path: Path) -> None:
    """verify --storage s3://...: each run at URI/run-XX, finished (manifest last) and checkable there."""
    bucket = s3_server.make_bucket("verification")
    out = tmp_path / "verify"
    result = run_cli("verify", "--config", str(TINY_CONFIG), "--set", "training.max_steps=3", "--set",
                     "training.sample_max_new_tokens=2", "--runs", "2", "--threads", "1", "--output-dir", str(out),
                     "--storage", f"s3://{bucket}/v", env=s3_server.env())
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("run-01", "run-02"):
        checked = run_cli("check", f"s3://{bucket}/v/{name}", env=s3_server.env())
        assert checked.returncode == 0 and "intact" in checked.stdout, checked.stdout + checked.stderr
    assert deterministic_files(out / "run-01") == deterministic_files(out / "run-02")
    analyzed = run_cli("analyze", f"s3://{bucket}/v/run-01", f"s3://{bucket}/v/run-02", "--output-dir",
                       str(tmp_path / "report"), env=s3_server.env())
    assert analyzed.returncode == 0, analyzed.stdout + analyzed.stderr
