"""Data-parallel training (`--workers N`): the bits do not depend on the number of workers.

Real torch.distributed (gloo) process groups on this machine: a verification of 4 runs with 1,
2, 1 and 3 workers (3 workers own unequal shares of 4 micro-batches), a worker killed mid-run
(the run stops at once, its checkpoint stays valid and one worker continues it to the same
bits), SIGTERM to a 2-worker run, 2 workers placed by a real local Ray cluster, the refusals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import TINY_CONFIG, WORLD_CONFIG, assert_no_traceback, deterministic_files, run_cli
from qlorax.artifacts import check_run_dir, load_manifest, read_json
from qlorax.layout import MANIFEST


def test_one_two_and_three_workers_give_the_same_bits(world_verification: Path) -> None:
    report = read_json(world_verification / "reproducibility_analysis_report.json")
    assert report["overall_analysis"]["metrics_reproducibility"]["reproducibility_score"] == 1.0
    runs = [world_verification / f"run-0{i}" for i in range(1, 5)]
    assert [read_json(run / "env.json")["workers"] for run in runs] == [1, 2, 1, 3]
    reference = deterministic_files(runs[0])
    assert len(reference) >= 7 and all(deterministic_files(run) == reference for run in runs[1:])
    two = runs[1]
    env_two = read_json(two / "env.json")
    assert (env_two["workers"], env_two["executor"], env_two["threads"]) == (2, "local", 1)
    # World size is treated like the thread count: two groups, one environment, no drift.
    cross = report["cross_environment_analysis"]
    assert cross["attribution"] == "none"
    assert "workers" in cross["differing_fingerprint_keys"] and "workers" not in cross["drift_keys"]
    assert any("2 workers" in group["label"] for group in cross["groups"])
    assert "worker counts 1, 2, 3" in " ".join(report["conclusions"])


def test_more_workers_than_micro_batches_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "refused"
    result = run_cli("train", "--config", str(TINY_CONFIG), "--workers", "2", "--output-dir", str(out))
    assert result.returncode == 2
    assert_no_traceback(result)
    assert "gradient_accumulation_steps is 1" in result.stderr and "at most 1 worker" in result.stderr
    assert not out.exists()


def start_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", "from qlorax.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def listening_sockets(pids: list[int]) -> list[str]:
    """The local addresses of the TCP sockets these processes listen on, as `ss` shows them."""
    out = subprocess.run(["ss", "-H", "-l", "-t", "-n", "-p"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(pid) for pid in re.findall(r"pid=(\d+)", line)}
        if owners & set(pids):
            found.append(line.split()[3])
    return found


def helper_worker_pid(launcher_pid: int) -> int:
    """The worker of rank 1: the launcher's child whose stdout is /dev/null (rank 0 keeps the pipe)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    helpers = [int(pid) for pid in children if os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"]
    assert len(helpers) == 1, children
    return helpers[0]


def test_sigterm_stops_every_worker_after_the_same_step(world_verification: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "stopped"
    process = start_cli("train", *WORLD_CONFIG, "--workers", "2", "--output-dir", str(run_dir))
    wait_for(run_dir / "checkpoints" / "step-00000003", process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert "interrupted after step" in stderr and "error:" not in stderr and "worker 1 of 2" not in stderr
    resumed = run_cli("resume", str(run_dir), "--workers", "2")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert deterministic_files(run_dir) == deterministic_files(world_verification / "run-01")


def test_ray_without_authentication_is_refused(tmp_path: Path) -> None:
    """RAY_AUTH_MODE=disabled would start a cluster anyone reaching its ports can run code on:
    exit 2, one paragraph, nothing trained."""
    run_dir = tmp_path / "open"
    result = run_cli("train", *WORLD_CONFIG, "--executor", "ray", "--workers", "2", "--output-dir", str(run_dir),
                     env={"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_no_traceback(result)
    assert "RAY_AUTH_MODE=disabled" in result.stderr and "CVE-2023-48022" in result.stderr
    assert not (run_dir / "adapter_model.safetensors").exists()


def test_a_lost_worker_restarts_by_itself_to_the_bits_of_one_worker(world_verification: Path,
                                                                    tmp_path: Path) -> None:
    """--max-restarts 2: rank 1 SIGKILLed after the step-3 checkpoint; nobody types anything, the
    run restarts from that checkpoint and finishes (exit 0) with an uninterrupted one-worker run's
    bits; the restart is in training_metadata.json, the audit log and Prometheus' counter, and
    the durable copy (--storage, a shared path) is a finished run that `qlorax check` accepts."""
    run_dir, storage, audit, metrics = (tmp_path / "run", tmp_path / "store", tmp_path / "audit.jsonl",
                                        tmp_path / "metrics.prom")
    process = start_cli("train", *WORLD_CONFIG, "--workers", "2", "--max-restarts", "2", "--output-dir",
                        str(run_dir), "--storage", str(storage), "--audit-log", str(audit),
                        "--metrics-textfile", str(metrics))
    wait_for(storage / "checkpoints" / "step-00000003" / "checkpoint_manifest.json", process)
    os.kill(helper_worker_pid(process.pid), signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert "restart 1 of at most 2: exit 3: worker 1 of 2 was killed by SIGKILL" in stderr, stderr
    assert deterministic_files(run_dir) == deterministic_files(world_verification / "run-01")
    metadata = read_json(run_dir / "training_metadata.json")
    [restart] = metadata["restarts"]
    assert (restart["workers_before"], restart["workers_after"]) == (2, 2)
    assert restart["cause"].startswith("exit 3: worker 1 of 2 was killed by SIGKILL") and restart["time"]
    assert metadata["resumed_from_step"] == 3
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["event_type"] for e in events if e["event_type"] == "training_restart"] == ["training_restart"]
    assert re.search(r'^reproducible_training_restarts_total\{environment="[^"]+"\} 1\.0$', metrics.read_text(), re.M)
    assert load_manifest(storage) == load_manifest(run_dir)  # the finished run on storage, manifest last
    checked = run_cli("check", str(storage))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_micro_batches_side_by_side_give_the_bits_of_one_thread(world_verification: Path, tmp_path: Path) -> None:
    """One worker at 2 threads owning 4 micro-batches per step computes 2 at a time, one thread
    each (qlorax.micro_batches): the deterministic artifacts are the 1-worker, 1-thread run's."""
    run_dir = tmp_path / "run"
    result = run_cli("train", *WORLD_CONFIG, "--threads", "2", "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "micro-batches side by side: up to 2 at once" in (run_dir / "train.log").read_text()
    assert deterministic_files(run_dir) == deterministic_files(world_verification / "run-01")


@pytest.mark.parametrize(("extra", "message"), [
    (["--workers", "2", "--min-workers", "3"], "--min-workers 3 is above --workers 2"),
    (["--max-restarts", "1", "--set", "training.save_steps=12"], "needs checkpoints to restart from"),
    (["--executor", "ray", "--workers", "2", "--max-restarts", "1"], "pass --storage URI"),
])
def test_a_recovery_policy_that_cannot_work_is_refused(tmp_path: Path, extra: list[str], message: str) -> None:
    """Exit 2, one paragraph, before anything trains or is written."""
    run_dir = tmp_path / "run"
    result = run_cli("train", *WORLD_CONFIG, *extra, "--output-dir", str(run_dir))
    assert result.returncode == 2, result.stdout + result.stderr
    assert_no_traceback(result)
    assert message in " ".join(result.stderr.split()), result.stderr
    assert not run_dir.exists()


def worker_processes() -> tuple[list[psutil.Process], list[psutil.Process]]:
    """Our training children anywhere on the machine: (rank 0, the others); rank 0 is the one
    holding its run's train.log open (the others write nothing)."""
    found = [p for p in psutil.process_iter(["cmdline"]) if "qlorax.worker" in " ".join(p.info["cmdline"] or [])]
    lead = [p for p in found if any(f.path.endswith("train.log") for f in p.open_files())]
    return lead, [p for p in found if p not in lead]


def test_a_ray_placed_run_restarts_from_durable_storage_to_the_same_bits(world_verification: Path,
                                                                        tmp_path: Path) -> None:
    """--executor ray --storage PATH --max-restarts 2: rank 1's process SIGKILLed after the stored
    step-3 checkpoint; the run restarts by itself, every worker continues from the stored
    checkpoint (rank 0's node-local directory is gone), and the bits are one worker's."""
    run_dir, storage = tmp_path / "ray", tmp_path / "store"
    process = start_cli("train", *WORLD_CONFIG, "--executor", "ray", "--workers", "2", "--max-restarts", "2",
                        "--storage", str(storage), "--output-dir", str(run_dir))
    wait_for(storage / "checkpoints" / "step-00000003" / "checkpoint_manifest.json", process)
    lead, others = worker_processes()
    assert len(lead) == 1 and len(others) == 1, (lead, others)
    others[0].kill()
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert "continuing from stored checkpoint step-00000003" in stdout + stderr
    [restart] = read_json(run_dir / "training_metadata.json")["restarts"]
    assert "worker 1 of 2 failed first (exit 137)" in restart["cause"], restart
    assert check_run_dir(run_dir).intact
    env = read_json(run_dir / "env.json")
    assert (env["workers"], env["executor"]) == (2, "ray")
    # Ray's token authentication was on for the cluster the command started, and that is recorded.
    assert env["executor_facts"] == {"executor": "ray", "ray_auth_mode": "token", "ray_cluster": "local"}
    assert deterministic_files(run_dir) == deterministic_files(world_verification / "run-01")
    assert load_manifest(storage) == load_manifest(run_dir)


def test_more_losses_than_max_restarts_stop_the_run_with_its_checkpoints(tmp_path: Path) -> None:
    """Every socket of the run on loopback (ss); --max-restarts 1 and rank 1 lost twice: exit 3,
    one paragraph naming both causes, the checkpoints kept for `qlorax resume`."""
    run_dir = tmp_path / "run"
    process = start_cli("train", *WORLD_CONFIG, "--workers", "2", "--max-restarts", "1", "--output-dir", str(run_dir))
    wait_for(run_dir / "checkpoints" / "step-00000003", process)
    workers = [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
    listening = listening_sockets(workers)
    assert len(listening) >= 2, listening  # rank 0's store and the gloo listeners, seen by ss
    assert all(address.startswith("127.0.0.1:") for address in listening), listening  # never *:port
    first = helper_worker_pid(process.pid)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while True:  # the restarted run's rank 1: a new process
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        if len(children) == 2 and str(first) not in children:
            try:
                second = helper_worker_pid(process.pid)
                break
            except (AssertionError, OSError):
                pass
        time.sleep(0.05)
    os.kill(second, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 3, stdout + stderr
    assert "Traceback" not in stdout + stderr
    message = " ".join(stderr.split())
    assert "the run failed 2 times, more than --max-restarts 1 allows: 1. exit 3: worker 1 of 2 was killed" in message
    # the second loss may come while rank 0 waits for its peer to join: it is then stopped too (exit 137)
    second_cause = r"; 2\. exit (3|137): worker 1 of 2 was killed by SIGKILL(; rank 0: [^;]*)?; its checkpoints"
    assert re.search(second_cause, message), message
    assert f"qlorax resume {run_dir}" in message and message.count("rank 0: ") <= 2, message
    assert not (run_dir / MANIFEST).exists()
    assert read_json(run_dir / "training_metadata.json")["status"] == "failed"
    # Another world size continuing these checkpoints to the same bits: the multi-node test
    # (3 workers, then 2 after a lost node) and test_resume's resumes show it.

def test_four_two_worker_runs_started_together_all_finish(tmp_path: Path) -> None:
    """Issue 21 item 7: each run's rank 0 takes over a socket its launcher bound on port 0, so
    runs started at the same moment cannot pick one port (they used to collide: exit 3)."""
    config = [*WORLD_CONFIG, "--set", "training.max_steps=2", "--set", "training.save_steps=2"]
    processes = [start_cli("train", *config, "--workers", "2", "--output-dir", str(tmp_path / f"run-{i}"))
                 for i in range(4)]
    for process in processes:
        stdout, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stdout + stderr
    digests = [deterministic_files(tmp_path / f"run-{i}") for i in range(4)]
    assert all(digest == digests[0] for digest in digests[1:])
