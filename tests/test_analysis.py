"""qlorax analyze: scores, divergence, attribution, reports, and no torch on the way."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qlorax.analysis import (
    analyze_runs,
    compare_adapters,
    discover_runs,
    plot_loss_curves,
    ulp_distance,
    write_reports,
)
from qlorax.analysis.workflow import run_analyze
from qlorax.artifacts import write_manifest
from qlorax.errors import QloraxError
from qlorax.layout import REPORT_JSON
from synthetic_runs import adapter_tensors, make_run, make_runs

CLI = [sys.executable, "-c", "from qlorax.cli import main; main()"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def analyze(root: Path) -> dict:
    return analyze_runs(discover_runs([root]))


def score_of(report: dict) -> float:
    return report["overall_analysis"]["metrics_reproducibility"]["reproducibility_score"]


def test_identical_runs_score_one_and_exit_zero(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_run(root, "r1", threads=1)
    make_runs(root, ["r2", "r3"], threads=2)
    proc = cli("analyze", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((root / REPORT_JSON).read_text())
    assert score_of(report) == 1.0
    assert report["analysis_metadata"]["total_runs_analyzed"] == 3
    assert report["divergence"] is None
    assert report["cross_environment_analysis"]["attribution"] == "none"
    assert report["cross_environment_analysis"]["differing_fingerprint_keys"] == ["threads"]
    assert all(r["matches_reference"] and r["status"] == "ok" for r in report["runs"])
    assert "All 3 runs are bit-identical across thread counts 1, 2." in report["conclusions"]
    metrics = report["overall_analysis"]["metrics_reproducibility"]["per_metric"]
    assert metrics["eval_loss"]["identical"] and metrics["eval_loss"]["variance"] == 0.0
    assert {"train_loss", "final_train_loss", "eval_perplexity", "train_perplexity"} <= set(metrics)
    agreement = report["overall_analysis"]["artifact_agreement"]["adapter_model.safetensors"]
    assert agreement["distinct_digests"] == 1 and agreement["agreeing_runs"] == 3
    assert report["summary"] == {**report["summary"], "reproducibility_score": 1.0, "artifact_count": 11,
                                 "training_duration": 21.5, "peak_memory_mb": 612.0}
    assert "100.0%" in proc.stdout and "r3" in proc.stdout


def test_different_adapter_scores_two_thirds_and_lists_tensors(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_runs(root, ["r1", "r2"])
    perturbed = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    make_run(root, "r3", perturb_ulps=2, perturb_tensors=(perturbed,))
    proc = cli("analyze", str(root), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "out" / REPORT_JSON).read_text())
    assert score_of(report) == pytest.approx(2 / 3)
    [entry] = report["divergence"]
    assert entry["run"] == "r3" and entry["reference_run"] == "r1"
    assert "adapter_model.safetensors" in entry["differing_files"]
    [tensor] = entry["tensors"]
    assert tensor["name"] == perturbed
    assert tensor["max_ulp_distance"] == 2 and tensor["max_abs_diff"] > 0
    assert tensor["differing_elements"] == tensor["numel"] == 8 * 64
    assert entry["tensors_compared"] == 8 and not entry["shapes_differ"]
    assert any("r3" in c and "2 ULP" in c for c in report["conclusions"])


def test_whole_adapter_differs_tensors_sorted_with_nonzero_ulp(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_runs(root, ["a", "b"])
    make_run(root, "c", adapter_seed=7)
    report = analyze(root)
    [entry] = report["divergence"]
    names = [t["name"] for t in entry["tensors"]]
    assert names == sorted(names) and len(names) == 8
    assert all(t["max_ulp_distance"] > 0 and t["max_rel_diff"] > 0 for t in entry["tensors"])
    # the first lora digest in the trace (step 4 with trace_every=4) already differs
    assert entry["first_divergent_step"] == 4 and entry["first_divergent_field"] == "lora_sha256"


@pytest.mark.parametrize(
    ("field", "expected"),
    [("loss", "loss"), ("grad_norm", "grad_norm"), ("tokens", "tokens"), ("lr", "lr"),
     ("truncate", "trace_length")],
)
def test_trace_divergence_names_step_and_field(tmp_path: Path, field: str, expected: str) -> None:
    root = tmp_path / "runs"
    make_runs(root, ["r1", "r2"])
    make_run(root, "r3", diverge_at=7, diverge_field=field)
    report = analyze(root)
    [entry] = report["divergence"]
    assert entry["first_divergent_step"] == 7
    assert entry["first_divergent_field"] == expected
    if expected != "trace_length":
        assert entry["reference_values"]["step"] == entry["run_values"]["step"] == 7
        assert entry["reference_values"] != entry["run_values"]
    else:
        assert entry["run_values"] is None and entry["reference_values"]["step"] == 7
    assert any(f"at step 7 ({expected})" in c for c in report["conclusions"])


def test_loss_reported_before_grad_norm_and_lora_digest(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_run(root, "r1")
    make_run(root, "r2", diverge_at=8, diverge_field="loss", trace_every=4)
    make_run(root, "r3", diverge_at=8, diverge_field="lora_sha256", trace_every=4)
    make_run(root, "r1b")
    report = analyze(root)
    by_run = {e["run"]: e for e in report["divergence"]}
    assert by_run["r2"]["first_divergent_field"] == "loss"
    assert "lora_sha256" in by_run["r2"]["differing_fields"]  # step 8 carries a lora digest
    assert by_run["r3"]["first_divergent_step"] == 8
    assert by_run["r3"]["first_divergent_field"] == "lora_sha256"


def test_tampered_adapter_is_manifest_mismatch_never_matching(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_runs(root, ["r1", "r2"])
    make_run(root, "r3", tamper="adapter_model.safetensors")
    report = analyze(root)
    run3 = report["runs"][2]
    assert run3["status"] == "manifest_mismatch" and not run3["matches_reference"]
    assert run3["integrity"]["altered"] == ["adapter_model.safetensors"]
    assert score_of(report) == pytest.approx(2 / 3)
    assert report["analysis_metadata"]["tampered_runs"] == 1
    assert report["cross_environment_analysis"]["attribution"] == "run_integrity"
    assert ("Run r3: adapter_model.safetensors does not match its manifest (altered after the run)."
            in report["conclusions"])


def test_tampered_informational_file_still_fails(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_run(root, "r1")
    make_run(root, "r2", tamper="train.log")
    report = analyze(root)
    assert report["runs"][1]["status"] == "manifest_mismatch"
    assert score_of(report) == 0.5


def test_incomplete_runs_count_in_the_denominator(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_runs(root, ["r1", "r2"])
    make_run(root, "r3", manifest=False)
    make_run(root, "r4", status="running")
    report = analyze(root)
    assert score_of(report) == 0.5
    assert report["analysis_metadata"]["incomplete_runs"] == 2
    assert report["analysis_metadata"]["complete_runs"] == 2
    statuses = {r["name"]: (r["status"], r["matches_reference"]) for r in report["runs"]}
    assert statuses["r3"] == ("incomplete", False) and statuses["r4"] == ("incomplete", False)
    assert any("r3 is incomplete" in c for c in report["conclusions"])


def test_environment_drift(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_runs(root, ["strict-1", "strict-2"], profile="strict")
    make_runs(root, ["fast-1", "fast-2"], profile="fast", adapter_seed=3)
    report = analyze(root)
    cross = report["cross_environment_analysis"]
    assert cross["attribution"] == "environment_drift"
    assert "profile" in cross["differing_fingerprint_keys"]
    assert len(cross["groups"]) == 2
    assert all(g["agreement_within"] and g["distinct_digests"] == 1 for g in cross["groups"])
    assert not cross["agreement_across_groups"]
    assert score_of(report) == 0.5
    assert any("environment drift" in c for c in report["conclusions"])


def test_nondeterminism_within_one_environment(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_runs(root, ["r1", "r2"])
    make_run(root, "r3", diverge_at=3)
    cross = analyze(root)["cross_environment_analysis"]
    assert cross["attribution"] == "nondeterminism"
    [group] = cross["groups"]
    assert not group["agreement_within"] and group["distinct_digests"] == 2


def test_thread_count_only_difference_is_nondeterminism(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_runs(root, ["t1-a", "t1-b"], threads=1)
    make_runs(root, ["t2-a", "t2-b"], threads=2, perturb_ulps=1)
    cross = analyze(root)["cross_environment_analysis"]
    assert all(g["agreement_within"] for g in cross["groups"])
    assert cross["differing_fingerprint_keys"] == ["threads"]
    assert cross["attribution"] == "nondeterminism"


def test_reports_written_with_one_curve_per_run(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_runs(root, ["r1", "r2"])
    make_run(root, "r3", diverge_at=5)
    make_run(root, "r4", manifest=False)
    run_dirs = discover_runs([root])
    report = analyze_runs(run_dirs)
    paths = write_reports(report, run_dirs, tmp_path / "out")
    assert set(paths) == {"json", "markdown", "plot"}
    png = paths["plot"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert report["report_files"]["loss_curves_plotted"] == 4
    assert plot_loss_curves(report, run_dirs, tmp_path / "again.png") == 4
    markdown = paths["markdown"].read_text()
    assert "Reproducibility score: 50.0%" in markdown
    for needle in ("| r3 |", "adapter_model.safetensors", "First divergent step: 5", "## Environments",
                   "loss_curves.png"):
        assert needle in markdown
    on_disk = json.loads(paths["json"].read_text())
    assert on_disk["report_files"]["loss_curves_plotted"] == 4
    assert on_disk["summary"]["reproducibility_score"] == 0.5


def test_discover_runs_nested_dedup_and_checkpoints(tmp_path: Path) -> None:
    make_run(tmp_path / "native", "seed-1")
    make_run(tmp_path / "docker" / "deep", "seed-1")
    found = discover_runs([tmp_path, tmp_path / "native" / "seed-1", tmp_path / "native"])
    assert found == sorted([(tmp_path / "docker" / "deep" / "seed-1").resolve(),
                            (tmp_path / "native" / "seed-1").resolve()])
    assert not any("checkpoints" in str(p) for p in found)
    report = analyze_runs(found)
    assert [r["name"] for r in report["runs"]] == ["docker/deep/seed-1", "native/seed-1"]
    assert score_of(report) == 1.0


def test_user_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(QloraxError) as excinfo:
        discover_runs([tmp_path / "missing"])
    assert excinfo.value.exit_code == 2 and "missing" in excinfo.value.message
    with pytest.raises(QloraxError, match="no run directories found"):
        discover_runs([tmp_path / "empty"])
    for target in (tmp_path / "missing", tmp_path / "empty"):
        proc = cli("analyze", str(target))
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr and str(target.name) in proc.stderr


def test_output_dir_inside_a_run_is_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path, "r1")
    with pytest.raises(QloraxError, match="would alter the run"):
        run_analyze([tmp_path], run / "reports")
    assert not (run / "reports").exists()


def test_ties_go_to_the_first_run(tmp_path: Path) -> None:
    make_run(tmp_path, "a")
    make_run(tmp_path, "b", adapter_seed=5)
    metrics = analyze(tmp_path)["overall_analysis"]["metrics_reproducibility"]
    assert metrics["reference_run"] == "a" and metrics["matching_runs"] == 1
    assert metrics["reproducibility_score"] == 0.5


def test_ulp_distance_sign_magnitude() -> None:
    f = np.float32
    one_up = np.nextafter(f(1.0), f(2.0), dtype=np.float32)
    tiny = np.nextafter(f(0.0), f(1.0), dtype=np.float32)
    a = np.array([0.0, -0.0, 1.0, tiny, -1.0], dtype=np.float32)
    b = np.array([-0.0, 0.0, one_up, -tiny, np.nextafter(f(-1.0), f(-2.0), dtype=np.float32)])
    assert ulp_distance(a, b.astype(np.float32)).tolist() == [0, 0, 1, 2, 1]
    big = np.array([np.finfo(np.float32).max], dtype=np.float32)
    assert ulp_distance(big, -big)[0] == 2 * int(big.view(np.int32)[0])


def test_compare_adapters_missing_and_shape_mismatch() -> None:
    ref = dict(adapter_tensors(0, 1, 16, 4))
    other = dict(ref)
    name_a, name_b = sorted(ref)[:2]
    del other[name_a]
    other[name_b] = np.zeros((3, 3), dtype=np.float32)
    other["extra.weight"] = np.ones(2, dtype=np.float32)
    out = compare_adapters(ref, other)
    by_name = {t["name"]: t for t in out["tensors"]}
    assert by_name[name_a]["missing_in"] == "run"
    assert by_name["extra.weight"]["missing_in"] == "reference"
    assert by_name[name_b]["shape_mismatch"] and out["shapes_differ"]
    assert [t["name"] for t in out["tensors"]] == sorted(by_name)


def test_analyze_does_not_import_torch(tmp_path: Path) -> None:
    make_runs(tmp_path / "runs", ["r1", "r2"])
    code = (
        "import sys; from pathlib import Path; import qlorax.cli\n"
        "from qlorax.analysis.workflow import run_analyze, run_check, run_gates\n"
        f"report, files = run_analyze([Path({str(tmp_path / 'runs')!r})], Path({str(tmp_path / 'out')!r}))\n"
        "run_gates(files['json']); run_check(Path(report['analysis_metadata']['run_dirs'][0]))\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('score', report['summary']['reproducibility_score'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "score 1.0" in proc.stdout
    # and the real command line, through -X importtime
    proc = subprocess.run([sys.executable, "-X", "importtime", *CLI[1:], "analyze", str(tmp_path / "runs"),
                           "-o", str(tmp_path / "out2")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "matplotlib" in proc.stderr  # importtime output is there...
    assert not re.search(r"\|\s+torch(\.|\s*$)", proc.stderr, re.MULTILINE)  # ...without torch


def test_nan_metrics_and_corrupt_adapter_header_still_give_strict_json(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_run(root, "r1")
    odd = make_run(root, "r2", manifest=False)
    results = json.loads((odd / "results.json").read_text())
    results["eval_loss"] = float("nan")
    (odd / "results.json").write_text(json.dumps(results))
    write_manifest(odd)
    make_run(root, "r3", tamper=None)
    (root / "r3" / "adapter_model.safetensors").write_bytes(b"\xff" * 64)  # header destroyed
    run_dirs = discover_runs([root])
    report = analyze_runs(run_dirs)
    paths = write_reports(report, run_dirs, tmp_path / "out")
    strict = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert strict["overall_analysis"]["metrics_reproducibility"]["per_metric"]["eval_loss"]["mean"] == "nan"
    r3 = next(e for e in strict["divergence"] if e["run"] == "r3")
    assert r3["status"] == "manifest_mismatch" and "cannot compare" in r3["tensor_error"]
