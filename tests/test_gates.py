"""Quality gates: the guide's interface, every blocking gate enforced, thresholds YAML validated."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlorax.analysis import analyze_runs, discover_runs
from qlorax.errors import QloraxError
from qlorax.gates import GateResult, QualityGates, gates_from_report, load_thresholds
from qlorax.layout import REPORT_JSON
from synthetic_runs import make_runs

CLI = [sys.executable, "-c", "from qlorax.cli import main; main()"]
GOOD = {"reproducibility_score": 1.0, "training_duration": 120.0, "peak_memory_mb": 2048.0,
        "artifact_count": 11}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def good_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("gates") / "runs"
    make_runs(root, ["r1", "r2"])
    return analyze_runs(discover_runs([root]))


def write_report(path: Path, report: dict, **summary: object) -> Path:
    report = copy.deepcopy(report)
    report["summary"].update(summary)
    path.write_text(json.dumps(report))
    return path


def test_defaults_match_the_guide() -> None:
    gates = QualityGates().gates
    assert gates["reproducibility_score"]["min"] == 1.0
    assert gates["training_time"]["max"] == 300
    assert gates["memory_usage"]["max"] == 8192
    assert gates["artifact_count"]["min"] == 6
    assert all(g["blocking"] for g in gates.values())


def test_good_results_pass() -> None:
    passed, issues = QualityGates().evaluate_run(GOOD)
    assert passed and issues == []
    results = QualityGates().evaluate(GOOD)
    assert all(isinstance(r, GateResult) and r.passed for r in results)
    assert {r.name: r.comparison for r in results} == {
        "reproducibility_score": ">=", "training_time": "<=", "memory_usage": "<=", "artifact_count": ">="}


@pytest.mark.parametrize(
    ("key", "value", "gate"),
    [("reproducibility_score", 0.5, "reproducibility_score"), ("training_duration", 301.0, "training_time"),
     ("peak_memory_mb", 9000.0, "memory_usage"), ("artifact_count", 5, "artifact_count")],
)
def test_every_blocking_gate_fails_the_run(key: str, value: float, gate: str) -> None:
    passed, issues = QualityGates().evaluate_run({**GOOD, key: value})
    assert not passed
    assert len(issues) == 1 and issues[0].startswith(gate)


def test_missing_value_fails_its_gate() -> None:
    results = {k: v for k, v in GOOD.items() if k != "peak_memory_mb"}
    passed, issues = QualityGates().evaluate_run(results)
    assert not passed
    assert len(issues) == 1 and "memory_usage" in issues[0] and "missing" in issues[0]


def test_non_blocking_failure_is_reported_but_passes() -> None:
    gates = QualityGates({"training_time": {"max": 60, "blocking": False}})
    passed, issues = gates.evaluate_run(GOOD)
    assert passed and issues and "non-blocking" in issues[0] and "training_time" in issues[0]


def test_gates_from_report(good_report: dict) -> None:
    flat = gates_from_report(good_report)
    assert flat["reproducibility_score"] == 1.0 and flat["artifact_count"] == 11
    assert gates_from_report(GOOD) == GOOD
    with pytest.raises(QloraxError, match="not a qlorax report"):
        gates_from_report({"hello": 1})
    assert QualityGates().evaluate_run(good_report) == (True, [])


def test_cli_good_report_passes(tmp_path: Path, good_report: dict) -> None:
    write_report(tmp_path / REPORT_JSON, good_report)
    proc = cli("gates", str(tmp_path))  # a folder holding the report works too
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "FAIL" not in proc.stdout


@pytest.mark.parametrize(
    ("summary", "gate"),
    [({"reproducibility_score": 2 / 3}, "reproducibility_score"),
     ({"training_duration": 900.0}, "training_time"),
     ({"peak_memory_mb": 16384.0}, "memory_usage"), ({"artifact_count": 3}, "artifact_count"),
     ({"peak_memory_mb": None}, "memory_usage")],
)
def test_cli_bad_report_exits_1_naming_the_gate(tmp_path: Path, good_report: dict, summary: dict,
                                                 gate: str) -> None:
    path = write_report(tmp_path / "report.json", good_report, **summary)
    proc = cli("gates", str(path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"Blocking gate(s) failed: {gate}" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_thresholds_yaml_overrides(tmp_path: Path, good_report: dict) -> None:
    path = write_report(tmp_path / "report.json", good_report, training_duration=900.0)
    thresholds = tmp_path / "gates.yaml"
    thresholds.write_text("reproducibility_score: {min: 1.0}\ntraining_time: {max: 1200}\n")
    assert cli("gates", str(path), "--thresholds", str(thresholds)).returncode == 0
    thresholds.write_text("training_time:\n  max: 600\n  blocking: false\n")
    proc = cli("gates", str(path), "--thresholds", str(thresholds))
    assert proc.returncode == 0 and "WARN" in proc.stdout
    assert load_thresholds(thresholds) == {"training_time": {"max": 600, "blocking": False}}


@pytest.mark.parametrize(
    ("text", "needle"),
    [("training_time: {maximum: 600}\n", "maximum"), ("latency: {max: 1}\n", "latency"),
     ("training_time: {max: fast}\n", "training_time.max"), ("training_time: [1, 2\n", "not valid YAML"),
     ("- 1\n- 2\n", "expected a mapping")],
)
def test_bad_thresholds_exit_2_naming_key_and_file(tmp_path: Path, good_report: dict, text: str,
                                                    needle: str) -> None:
    path = write_report(tmp_path / "report.json", good_report)
    thresholds = tmp_path / "bad-gates.yaml"
    thresholds.write_text(text)
    with pytest.raises(QloraxError) as excinfo:
        load_thresholds(thresholds)
    assert excinfo.value.exit_code == 2 and needle in excinfo.value.message
    proc = cli("gates", str(path), "--thresholds", str(thresholds))
    assert proc.returncode == 2
    assert needle in proc.stderr and "bad-gates.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_key_in_constructor_is_an_error() -> None:
    with pytest.raises(QloraxError, match="weigth"):
        QualityGates({"artifact_count": {"weigth": 1}})


def test_missing_report_or_thresholds_exit_2(tmp_path: Path, good_report: dict) -> None:
    proc = cli("gates", str(tmp_path / "nope.json"))
    assert proc.returncode == 2 and "nope.json" in proc.stderr
    path = write_report(tmp_path / "report.json", good_report)
    proc = cli("gates", str(path), "--thresholds", str(tmp_path / "absent.yaml"))
    assert proc.returncode == 2 and "absent.yaml" in proc.stderr
    (tmp_path / "garbage.json").write_text("{not json")
    proc = cli("gates", str(tmp_path / "garbage.json"))
    assert proc.returncode == 2 and "garbage.json" in proc.stderr
