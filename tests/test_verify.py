"""`qlorax verify` and `qlorax analyze` on real training runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CONFIG, BackgroundCli, assert_no_traceback, run_cli
from qlorax.artifacts import load_manifest, read_json

REPORT = "reproducibility_analysis_report.json"


def load_adapter(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(run / "adapter_model.safetensors")


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


# Test-only fault injection, written where a test wants it: in a process whose environment names
# a run directory, SIGKILL the process right after it wrote that directory's manifest (so the
# directory is a finished, intact run, but its process died).
KILL_AFTER_MANIFEST_HOOK = """
import os
import signal
from pathlib import Path

_TARGET = os.environ.get("QLORAX_TEST_KILL_AFTER_MANIFEST_OF")
if _TARGET:
    import qlorax.artifacts as _artifacts

    _write_manifest = _artifacts.write_manifest

    def write_manifest(run_dir, *args, **kwargs):
        written = _write_manifest(run_dir, *args, **kwargs)
        if Path(run_dir).name == _TARGET:
            os.kill(os.getpid(), signal.SIGKILL)
        return written

    _artifacts.write_manifest = write_manifest
"""


def test_a_verification_run_killed_after_its_manifest_counts_as_failed(tmp_path: Path) -> None:
    """Live (not synthetic runs): `verify --runs 2` of a 2-step tiny config where run-01's
    training child is SIGKILLed just after writing its manifest. Its directory is then a finished,
    intact run, bit-identical to run-02's; only its process's exit code says it failed. It must
    count as failed: score 0.5, exit 1."""
    import signal

    from qlorax.analysis import analyze_runs, discover_runs
    from qlorax.artifacts import check_run_dir
    from qlorax.layout import REPORT_SCORE, report_get

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_AFTER_MANIFEST_HOOK)
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    out = tmp_path / "verify"
    result = run_cli("verify", "--config", str(TINY_CONFIG), "--runs", "2", "--threads", "1",
                     "--set", "training.max_steps=2", "--set", "training.sample_max_new_tokens=2",
                     "--output-dir", str(out),
                     env={"PYTHONPATH": pythonpath, "QLORAX_TEST_KILL_AFTER_MANIFEST_OF": "run-01"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert_no_traceback(result)
    assert check_run_dir(out / "run-01").intact  # the directory alone would pass
    adapters = {load_manifest(out / name)["files"]["adapter_model.safetensors"]["sha256"]
                for name in ("run-01", "run-02")}
    assert len(adapters) == 1  # the same bits as the run that finished
    # What a verification blind to its processes' exit codes would report: the directories agree.
    assert report_get(analyze_runs(discover_runs([out])), REPORT_SCORE) == 1.0
    report = read_json(out / REPORT)
    assert report["overall_analysis"]["metrics_reproducibility"]["reproducibility_score"] == 0.5
    runs = {run["name"]: run for run in report["runs"]}
    assert (runs["run-01"]["status"], runs["run-01"]["exit_code"]) == ("incomplete", 128 + signal.SIGKILL)
    assert runs["run-02"]["status"] == "ok"
    assert "0.500" in result.stdout


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
    # The adapters themselves (the deterministic digest differs anyway: resolved_config.json names
    # the profile). Each group's two runs have one adapter. Across the groups other bits on any
    # processor: portable computes with other kernels (MKL's COMPATIBLE branch, fused AdamW,
    # exact rotary tables). The report's account of the adapters is the bits' own.
    adapters = {}
    for name, group in (("strict", strict), ("portable", tmp_path / "portable")):
        digests = {load_manifest(run)["files"]["adapter_model.safetensors"]["sha256"] for run in group.glob("run-*")}
        assert len(digests) == 1, (name, digests)
        adapters[name] = digests.pop()
    assert read_json(tmp_path / "portable" / "run-01" / "env.json")["fingerprint"]["cpu_capability"] == "AVX2"
    diverging = report["divergence"]
    assert len(diverging) == 2  # the two runs of the group that is not the reference's
    assert adapters["strict"] != adapters["portable"], adapters
    strict_tensors, portable_tensors = load_adapter(strict / "run-01"), load_adapter(tmp_path / "portable" / "run-01")
    assert strict_tensors.keys() == portable_tensors.keys()
    differing = {name for name in strict_tensors if not np.array_equal(strict_tensors[name], portable_tensors[name])}
    for entry in diverging:
        assert "adapter_model.safetensors" in entry["differing_files"]
        named = {tensor["name"] for tensor in entry["tensors"]}
        assert named and named <= differing, (named - differing)
        assert all(tensor["max_ulp_distance"] > 0 for tensor in entry["tensors"])
