"""The Kubernetes verification path, run live without a cluster.

deploy/k8s/verify-indexed-job.yaml starts N pods that each run scripts/k8s_verify_run.sh with
JOB_COMPLETION_INDEX = 0..N-1 on a shared volume; analysis-job.yaml then waits for the runs and
runs `qlorax analyze`. Here the same script runs as N=2 concurrent local processes (index 0 with
1 thread, index 1 with 2 threads) with the pod's environment taken from the manifest, and the
same analysis must score 1.0. Slow: it trains the tiny model twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, TINY_CONFIG, assert_no_traceback, run_cli
from qlorax.layout import REPORT_JSON

SCRIPT = REPO / "scripts" / "k8s_verify_run.sh"
VERIFY_JOB = REPO / "deploy" / "k8s" / "verify-indexed-job.yaml"
ANALYSIS_JOB = REPO / "deploy" / "k8s" / "analysis-job.yaml"


def pod_env(manifest: Path, container: str = "containers") -> dict[str, str]:
    """Literal env values of the manifest's (first) container, as a pod would get them."""
    with open(manifest, encoding="utf-8") as handle:
        spec = yaml.safe_load(handle)["spec"]["template"]["spec"]
    items = spec[container][0].get("env", [])
    return {item["name"]: item["value"] for item in items if "value" in item}


def find_scores(obj: Any) -> list[float]:
    """Every `reproducibility_score` in the report, wherever the schema puts it."""
    found: list[float] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "reproducibility_score" and isinstance(value, int | float):
                found.append(float(value))
            else:
                found.extend(find_scores(value))
    elif isinstance(obj, list):
        for item in obj:
            found.extend(find_scores(item))
    return found


@pytest.mark.slow
def test_indexed_job_runs_locally_and_reproduce(tmp_path: Path) -> None:
    assert TINY_CONFIG.is_file(), f"{TINY_CONFIG} is missing (the tiny test config)"
    runs_root = tmp_path / "verify"
    env = dict(os.environ)
    env.update(pod_env(VERIFY_JOB))
    env.pop("QLORAX_ENVIRONMENT", None)  # this is not a Kubernetes pod
    env.update({
        "RUNS_ROOT": str(runs_root),
        "QLORAX_CONFIG": str(TINY_CONFIG),
        "QLORAX_TOKEN_FILE": str(tmp_path / "no-token"),  # absent: no --token-file
        "QLORAX_BIN": str(Path(sys.executable).parent / "qlorax"),
    })
    assert env["QLORAX_THREADS_LIST"] == "1,2"

    # Two "pods" at once, as parallelism would run them, sharing one RUNS_ROOT.
    procs = [
        subprocess.Popen([str(SCRIPT)], env={**env, "JOB_COMPLETION_INDEX": str(index)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index in (0, 1)
    ]
    outputs = [proc.communicate(timeout=1800)[0] for proc in procs]
    for index, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"pod {index} failed:\n{output[-4000:]}"

    run_dirs = [runs_root / "run-00", runs_root / "run-01"]
    digests = []
    for run_dir, threads in zip(run_dirs, (1, 2), strict=True):
        manifest = json.loads((run_dir / "artifact_summary.json").read_text(encoding="utf-8"))
        digests.append(manifest["deterministic_digest"])
        env_json = json.loads((run_dir / "env.json").read_text(encoding="utf-8"))
        assert env_json["threads"] == threads, f"{run_dir.name} ran with {env_json['threads']} threads"
    assert digests[0] == digests[1], "1-thread and 2-thread runs differ"

    # The analysis Job's init container sees both runs finished ...
    with open(ANALYSIS_JOB, encoding="utf-8") as handle:
        init = yaml.safe_load(handle)["spec"]["template"]["spec"]["initContainers"][0]
    waited = subprocess.run(init["command"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "RUNS_ROOT": str(runs_root), "EXPECTED_RUNS": "2",
                                 "WAIT_TIMEOUT_SECONDS": "0", "POLL_SECONDS": "0"})
    assert waited.returncode == 0, waited.stdout + waited.stderr

    # ... and its analysis scores 1.0.
    result = run_cli("analyze", str(runs_root), "--output-dir", str(runs_root), timeout=900)
    assert_no_traceback(result)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((runs_root / REPORT_JSON).read_text(encoding="utf-8"))
    scores = find_scores(report)
    assert scores, "the report names no reproducibility_score"
    assert all(score == 1.0 for score in scores), scores
