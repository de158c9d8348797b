"""`qlorax verify --executor ray`: real local Ray clusters (2 CPUs, no dashboard), real training.

Each CLI call starts its own small Ray cluster and shuts it down (the executor does both).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import TINY_CONFIG, assert_no_traceback, run_cli
from qlorax.artifacts import check_run_dir, read_json
from qlorax.config import load_config
from qlorax.errors import QloraxError
from qlorax.executors.ray import _collect, run_ray
from qlorax.layout import REPORT_JSON
from qlorax.verify import RunSpec

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
KILL_ONCE = Path(__file__).resolve().parent / "ray_kill_once.py"
VERIFY_ARGS = ("verify", "--executor", "ray", "--runs", "2", "--config", str(TINY_CONFIG))


def verify(out: Path, *extra: str):
    result = run_cli(*VERIFY_ARGS, "--output-dir", str(out), *extra, env=ENV, timeout=300)
    assert_no_traceback(result)
    return result


def verify_killing_one_worker(out: Path, marker: Path, *extra: str):
    """`qlorax verify --executor ray` whose first task SIGKILLs its own worker once (tests/ray_kill_once.py)."""
    result = subprocess.run([sys.executable, str(KILL_ONCE), str(marker), *VERIFY_ARGS, "--output-dir", str(out),
                             *extra], capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    assert_no_traceback(result)
    return result


def assert_verified(out: Path, result) -> dict:
    """Exit 0, score 1.0, and both run directories intact against their manifests."""
    logs = "".join(p.read_text() for p in sorted((out / "logs").glob("*.log"))) if (out / "logs").is_dir() else ""
    assert result.returncode == 0, result.stdout + result.stderr + logs
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["overall_analysis"]["metrics_reproducibility"]["reproducibility_score"] == 1.0
    assert report["analysis_metadata"]["total_runs_analyzed"] == 2
    for name in ("run-01", "run-02"):
        assert check_run_dir(out / name).intact
        check = run_cli("check", str(out / name))
        assert check.returncode == 0, check.stdout + check.stderr
        assert not (out / name / "checkpoints").exists()  # checkpoints stay on the worker
    return report


def test_worker_killed_mid_run_is_retried_and_continues_from_durable_storage(tmp_path: Path) -> None:
    """verify --executor ray --threads 1,2 --shared-dir D --storage PATH: the worker killed after
    its run's first stored checkpoint is retried by Ray, and the retry continues from that
    checkpoint (a lost node costs a restart, not the run); the runs come back through the shared
    directory (moved out, then removed), both end up finished on storage, score 1.0. (The other
    way back, files returned through the object store, is the Ray-placed training tests'.)"""
    out, marker, storage, shared = (tmp_path / "verify", tmp_path / "kill-once.json", tmp_path / "store",
                                    tmp_path / "shared")
    result = verify_killing_one_worker(out, marker, "--threads", "1,2", "--storage", str(storage),
                                       "--shared-dir", str(shared))
    assert_verified(out, result)
    assert list(shared.iterdir()) == []  # the attempt directories were moved out and removed
    assert [read_json(out / name / "env.json")["threads"] for name in ("run-01", "run-02")] == [1, 2]
    killed = json.loads(marker.read_text())  # written just before the SIGKILL
    assert killed["attempt"] == 1 and killed["children"], killed
    log = (out / "logs" / f"{killed['run']}.log").read_text()
    assert f"qlorax ray executor: {killed['run']}, attempt 2 " in log, log
    assert "continuing from stored checkpoint step-" in log, log
    assert read_json(out / killed["run"] / "training_metadata.json")["resumed_from_step"] >= 1
    for name in ("run-01", "run-02"):
        checked = run_cli("check", str(storage / name))
        assert checked.returncode == 0, checked.stdout + checked.stderr
    other = "run-02" if killed["run"] == "run-01" else "run-01"
    assert "attempt 1 " in (out / "logs" / f"{other}.log").read_text()
    # The killed attempt's directory is gone and its training child did not outlive the cluster.
    assert not Path(killed["run_dir"]).parents[2].exists()  # .../.qlorax-ray-<id>/run-XX/attempt-1-*/run
    for pid in killed["children"]:
        if psutil.pid_exists(pid):
            try:
                assert "qlorax.worker" not in " ".join(psutil.Process(pid).cmdline())
            except psutil.NoSuchProcess:
                pass


def test_missing_ray_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    spec = RunSpec(1, tmp_path / "run-01", 1, load_config(TINY_CONFIG))
    with pytest.raises(QloraxError, match=r"install qlorax\[ray\]"):
        run_ray([spec], None, tmp_path / "logs", False)


def test_failed_task_gives_exit_code_1_and_a_log(tmp_path: Path) -> None:
    """After Ray gives up (retries spent), the run gets code 1 and the error in its log; nothing raises."""

    class GaveUp:
        def get(self, _ref):
            from ray.exceptions import WorkerCrashedError

            raise WorkerCrashedError()

    spec = RunSpec(1, tmp_path / "run-01", 1, load_config(TINY_CONFIG))
    assert _collect(GaveUp(), object(), spec, tmp_path) == 1
    log = (tmp_path / "run-01.log").read_text()
    assert "failed after up to 3 attempts" in log and "WorkerCrashedError" in log


LOOPBACK_PROBE = """
import json, psutil
from qlorax.executors.ray_common import load_ray, ray_auth_mode, start_ray
ray = load_ray(None)
assert start_ray(ray, None, 1)
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
nodes = [node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")]
listening = sorted({f"{proc.name()}={conn.laddr.ip}" for proc in psutil.Process().children(recursive=True)
                    for conn in proc.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN})
print(json.dumps({"nodes": nodes, "auth": ray_auth_mode(), "listening": listening}))
ray.shutdown()
"""


def test_a_cluster_qlorax_starts_listens_on_loopback_only_with_token_authentication() -> None:
    """The local cluster of `--executor ray` without --address: its node registers 127.0.0.1,
    every listening socket of gcs_server, raylet, agents and workers is on loopback, and Ray's
    token authentication is on (measured on the processes, not read from a config)."""
    done = subprocess.run([sys.executable, "-c", LOOPBACK_PROBE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["nodes"] == ["127.0.0.1"] and facts["auth"] == "token", facts
    names = {entry.split("=")[0] for entry in facts["listening"]}
    assert {"gcs_server", "raylet"} <= names, facts  # the probe saw Ray's own servers
    addresses = {entry.split("=", 1)[1] for entry in facts["listening"]}
    assert addresses <= {"127.0.0.1", "::ffff:127.0.0.1"}, facts
