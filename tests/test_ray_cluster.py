"""Several Ray nodes on this machine (ray.cluster_utils.Cluster, every node on 127.0.0.1, Ray's
token authentication on): a data-parallel run with durable storage on a real S3 server loses
rank 0's node, restarts by itself on the two nodes left, then loses a worker process and
restarts again, and finishes with the bits of an uninterrupted one-worker run. Secrets (a
Hugging Face token from --token-file, the S3 secret) reach the Ray-placed workers and appear
in no file of Ray's session directory, the run or the store, and in no output."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import WORLD_CONFIG, deterministic_files
from object_store import SeaweedS3
from qlorax.artifacts import check_run_dir, read_json

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Ray's token authentication, with a token of this test's own (a file, not ~/.ray)."""
    token = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def cluster(ray_env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """Three one-CPU nodes and a head without CPUs (tests/ray_local_cluster.py)."""
    process = subprocess.Popen([sys.executable, str(HERE / "ray_local_cluster.py"), "3"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, **ray_env})
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, f"the Ray cluster did not start (exit {process.poll()})"
    try:
        yield process, json.loads(line)
    finally:
        assert process.stdin is not None
        process.stdin.write("stop\n")
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def remove_node(cluster: tuple[subprocess.Popen[str], dict[str, Any]], node_id: str) -> None:
    process, _ = cluster
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(f"remove {node_id}\n")
    process.stdin.flush()
    assert process.stdout.readline().strip() == f"removed {node_id}"


def training_workers(raylets: dict[int, str]) -> list[psutil.Process]:
    """Our training children on the cluster's nodes (other qlorax runs on the machine ignored)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "qlorax.worker" in " ".join(process.info["cmdline"] or []) and any(
                    parent.pid in raylets for parent in process.parents()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def is_lead(process: psutil.Process) -> bool:
    """Rank 0 holds its run's train.log open; the other ranks write nothing."""
    try:
        return any(f.path.endswith("train.log") for f in process.open_files())
    except psutil.Error:
        return False


def node_of(process: psutil.Process, raylets: dict[int, str]) -> str:
    for parent in process.parents():
        if parent.pid in raylets:
            return raylets[parent.pid]
    raise AssertionError(f"{process.pid} runs under no node of the cluster")


def wait_until(condition: Any, process: subprocess.Popen[str], what: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.1)
    return found


def stored(server: SeaweedS3, key: str) -> bool:
    from pyarrow import fs

    return server.filesystem().get_file_info(key).type == fs.FileType.File


def test_a_three_node_cluster_loses_rank_0s_node_then_a_worker_and_keeps_the_bits(
        cluster: tuple[subprocess.Popen[str], dict[str, Any]], ray_env: dict[str, str], s3_server: SeaweedS3,
        world_verification: Path, tmp_path: Path) -> None:
    _, facts = cluster
    assert facts["addresses"] == ["127.0.0.1"] * 4 and facts["auth"] == "token", facts
    raylets = {pid: node for node, pid in facts["nodes"].items()}
    reference = world_verification / "run-01"  # an uninterrupted one-worker run of WORLD_CONFIG

    bucket = s3_server.make_bucket("multi-node")
    hub_token = "hf_" + secrets.token_hex(17)
    token_file = tmp_path / "hf-token"
    token_file.write_text(hub_token)
    run_dir = tmp_path / "run"
    env = {**os.environ, **ray_env, **s3_server.env()}
    process = subprocess.Popen(
        [sys.executable, "-c", "from qlorax.cli import main; main()", "train", *WORLD_CONFIG, "--executor", "ray",
         "--address", facts["address"], "--workers", "3", "--threads", "1", "--min-workers", "2",
         "--max-restarts", "2", "--storage", f"s3://{bucket}/run", "--token-file", str(token_file),
         "--output-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    checkpoint = f"{bucket}/run/checkpoints/step-{{:08d}}/checkpoint_manifest.json"
    wait_until(lambda: stored(s3_server, checkpoint.format(3)), process, "the stored step-3 checkpoint")
    workers = training_workers(raylets)
    assert len({node_of(worker, raylets) for worker in workers}) == 3  # one worker per node
    lead = [worker for worker in workers if is_lead(worker)]
    assert len(lead) == 1
    remove_node(cluster, node_of(lead[0], raylets))  # rank 0's machine is gone, its local checkpoints too

    wait_until(lambda: stored(s3_server, checkpoint.format(6)), process, "the stored step-6 checkpoint")
    survivors = wait_until(lambda: [w for w in training_workers(raylets) if not is_lead(w)], process,
                           "a worker of rank 1")
    survivors[0].kill()  # then one worker process of the restarted run
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stdout + stderr
    assert "Traceback" not in stdout + stderr

    restarts = read_json(run_dir / "training_metadata.json")["restarts"]
    assert [(r["workers_before"], r["workers_after"]) for r in restarts] == [(3, 2), (2, 2)], restarts
    assert "(exit 137)" in restarts[1]["cause"], restarts
    assert deterministic_files(run_dir) == deterministic_files(reference)
    assert check_run_dir(run_dir).intact
    env_record = read_json(run_dir / "env.json")
    assert (env_record["workers"], env_record["executor_facts"]["ray_auth_mode"]) == (2, "token")
    assert env_record["executor_facts"]["ray_cluster"] == "address"

    planted = [hub_token.encode(), s3_server.secret_key.encode()]
    output = (stdout + stderr).encode()
    assert not any(secret in output for secret in planted)
    for root in (Path(facts["session_dir"]), run_dir):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert not any(secret in data for secret in planted), path
    client = s3_server.filesystem()
    from pyarrow import fs

    for info in client.get_file_info(fs.FileSelector(f"{bucket}/run", recursive=True)):
        if info.type == fs.FileType.File:
            with client.open_input_stream(info.path) as handle:
                assert not any(secret in handle.read() for secret in planted), info.path


CONNECT_PROBE = """
import json, sys
from qlorax.executors.ray_common import executor_facts, load_ray, start_ray
ray = load_ray(sys.argv[1])
start_ray(ray, sys.argv[1], 1)
print(json.dumps(executor_facts(sys.argv[1])))
"""


def test_joining_a_cluster_without_authentication_warns() -> None:
    """--address of a cluster started with RAY_AUTH_MODE=disabled: qlorax joins it (the cluster is
    the user's) with a warning naming the risk, and records the mode (executor_facts, env.json)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen([sys.executable, str(HERE / "ray_local_cluster.py"), "1"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert process.stdout is not None and process.stdin is not None
    try:
        facts = json.loads(process.stdout.readline())
        assert facts["auth"] == "disabled"
        joined = subprocess.run([sys.executable, "-c", CONNECT_PROBE, facts["address"]], capture_output=True,
                                text=True, env=env, timeout=120, check=False)
        assert joined.returncode == 0, joined.stderr[-2000:]
        warning = " ".join(joined.stderr.split())
        assert "without token authentication (RAY_AUTH_MODE=disabled)" in warning and "CVE-2023-48022" in warning
        recorded = json.loads(joined.stdout.strip().splitlines()[-1])
        assert recorded == {"executor": "ray", "ray_auth_mode": "disabled", "ray_cluster": "address"}
    finally:
        process.stdin.write("stop\n")
        process.stdin.close()
        process.wait(timeout=60)
