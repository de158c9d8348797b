"""`qlorax verify` and `qlorax analyze` on real training runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, BackgroundCli, assert_no_traceback, run_cli
from qlorax.artifacts import load_manifest, read_json

REPORT = "reproducibility_analysis_report.json"


def test_verify_default_config_three_runs_mixed_threads_scores_one(default_verification: tuple[Path, object]) -> None:
    out, result = default_verification  # conftest: verify --runs 3 --threads 2,1 of the default config
    assert result.returncode == 0, result.stdout + result.stderr
    assert_no_traceback(result)
    report = read_json(out / REPORT)
    assert report["analysis_metadata"]["total_runs_analyzed"] == 3
    assert report["overall_analysis"]["metrics_reproducibility"]["reproducibility_score"] == 1.0
    assert sorted(run["threads"] for run in report["runs"]) == [1, 2, 2]
    assert report["divergence"] in (None, [])
    assert report["cross_environment_analysis"]["attribution"] == "none"
    assert "reproducibility score" in result.stdout and "1.000" in result.stdout
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["report_files"]["loss_curves_plotted"] == 3
    assert (out / "report.md").read_text().count("run-0") >= 3
    assert (out / "audit.jsonl").is_file()
    gates = run_cli("gates", str(out / REPORT))
    assert gates.returncode == 0, gates.stdout + gates.stderr
    events = [json.loads(line)["event_type"] for line in (out / "audit.jsonl").read_text().splitlines()]
    assert events == ["verification", "gates"]
    assert run_cli("audit", "verify", str(out / "audit.jsonl")).returncode == 0


# Test-only fault injection for one child process (see tests/lr_hook/sitecustomize.py).
LR_HOOK = Path(__file__).resolve().parent / "lr_hook"


def lr_change_env(from_step: int, factor: float) -> dict[str, str]:
    """Environment for a `qlorax train` whose learning rate is multiplied by `factor` from
    optimizer step `from_step` on; the launcher passes it through to the training child."""
    pythonpath = os.pathsep.join(p for p in (str(LR_HOOK), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": pythonpath, "QLORAX_TEST_LR_FACTOR_FROM_STEP": str(from_step),
            "QLORAX_TEST_LR_FACTOR": str(factor)}


def test_lr_hook_scales_only_the_steps_from_the_given_one() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lr_hook_under_test", LR_HOOK / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    import torch

    from qlorax.train import build_scheduler

    def lrs(build: object) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = build(optimizer, "linear", 1, 6)  # type: ignore[operator]
        seen = []
        for _ in range(6):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    plain, changed = lrs(build_scheduler), lrs(hook.wrap_schedule(build_scheduler, 4, 3.0))
    # Optimizer steps 1-3 untouched, steps 4-6 run with three times the lr.
    assert changed[:3] == plain[:3]
    assert changed[3:] == [lr * 3.0 for lr in plain[3:]]
    assert lrs(hook.wrap_schedule(build_scheduler, 1, 3.0)) == [lr * 3.0 for lr in plain]


@pytest.fixture(scope="module")
def broken_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """Four tiny runs: run-02 another seed, run-03 the same config with its lr tripled from step 4
    (injected from the test side), run-04 a copy of run-01 (the same config) tampered afterwards.
    The three trainings run one after another."""
    out = tmp_path_factory.mktemp("broken") / "verify"
    variants: dict[str, tuple[list[str], dict[str, str]]] = {
        "run-01": ([], {}),
        "run-02": (["--seed", "7"], {}),
        "run-03": ([], lr_change_env(from_step=4, factor=3)),
    }
    # One after another: a run trained beside the others once diverged at step 2 here (see the
    # 2026-12-03 closing note); until that is understood this fixture does not overlap them.
    for name, (args, env) in variants.items():
        result = run_cli("train", "--config", str(TINY_CONFIG), "--threads", "2", "--output-dir", str(out / name),
                         *args, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    shutil.copytree(out / "run-01", out / "run-04", symlinks=True)
    adapter = out / "run-04" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[len(data) // 2] ^= 0x10
    adapter.write_bytes(bytes(data))
    analyzed = run_cli("analyze", str(out))
    return out, analyzed


def test_broken_runs_score_below_one_and_exit_nonzero(broken_set: tuple[Path, object]) -> None:
    out, analyzed = broken_set
    assert analyzed.returncode == 1
    assert_no_traceback(analyzed)
    report = read_json(out / REPORT)
    assert report["overall_analysis"]["metrics_reproducibility"]["reproducibility_score"] == 0.25


def test_report_names_the_step_where_the_learning_rate_changed(broken_set: tuple[Path, object]) -> None:
    out, _ = broken_set
    report = read_json(out / REPORT)
    by_run = {entry["run"]: entry for entry in report["divergence"]}
    assert by_run["run-03"]["first_divergent_step"] == 4
    assert by_run["run-03"]["first_divergent_field"] == "lr"
    assert by_run["run-02"]["first_divergent_step"] == 1
    tensors = by_run["run-02"]["tensors"]
    assert tensors and all(t["max_ulp_distance"] > 0 and t["max_abs_diff"] > 0 for t in tensors if "max_abs_diff" in t)
    assert any("step 4" in line for line in report["conclusions"])


def test_a_different_seed_gives_a_different_adapter(broken_set: tuple[Path, object]) -> None:
    """run-01 (the tiny config's seed) and run-02 (--seed 7): another seed, another adapter."""
    out, _ = broken_set
    first, other_seed = (load_manifest(out / name)["files"] for name in ("run-01", "run-02"))
    assert first["adapter_model.safetensors"]["sha256"] != other_seed["adapter_model.safetensors"]["sha256"]
    assert read_json(out / "run-02" / "results.json")["seed"] == 7 != read_json(out / "run-01" / "results.json")["seed"]


def test_tampered_adapter_is_reported_as_manifest_mismatch(broken_set: tuple[Path, object]) -> None:
    out, analyzed = broken_set
    report = read_json(out / REPORT)
    run4 = next(run for run in report["runs"] if run["name"] == "run-04")
    assert run4["status"] == "manifest_mismatch"
    assert "adapter_model.safetensors" in run4["integrity"]["altered"]
    assert run4["matches_reference"] is False
    assert "run-04" in analyzed.stdout and "manifest" in analyzed.stdout


def test_analyze_attributes_strict_vs_portable_to_environment_drift(
        tmp_path: Path, tiny_verification: tuple[Path, BackgroundCli]) -> None:
    """The strict group is the session's shared tiny verification (strict, 2 runs, 1 thread, 2 steps);
    the portable group is the same verification under --profile portable."""
    strict, shared = tiny_verification
    result = run_cli("verify", "--config", str(TINY_CONFIG), "--runs", "2", "--threads", "1",
                     "--set", "training.max_steps=2", "--set", "training.sample_max_new_tokens=2",
                     "--profile", "portable", "--output-dir", str(tmp_path / "portable"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert shared.result().returncode == 0, shared.result().stderr
    assert read_json(strict / "run-01" / "env.json")["profile"] == "strict"
    analyzed = run_cli("analyze", str(strict), str(tmp_path / "portable"), "--output-dir",
                       str(tmp_path / "both"))
    assert analyzed.returncode == 1
    report = read_json(tmp_path / "both" / REPORT)
    cross = report["cross_environment_analysis"]
    assert len(cross["groups"]) == 2
    assert {group["fingerprint"]["profile"] for group in cross["groups"]} == {"strict", "portable"}
    assert all(group["agreement_within"] for group in cross["groups"])
    assert cross["attribution"] == "environment_drift"
    assert "profile" in cross["drift_keys"]
    assert any("environment drift" in line for line in report["conclusions"])
