"""`qlorax probe` and `verify --cpu`: the first training step on processors that QEMU emulates.

One live probe (module scope) runs the tiny preset's first step natively, under
`qemu-x86_64 -cpu Haswell-v4` (Intel), `-cpu EPYC-Rome-v1` (AMD) and `-cpu Nehalem-v1` (no
AVX2) with the portable profile; the tests below read its report. `verify --cpu` is tested live only for its refusal
(before any training); the rest is static: the comparison and ULP code on synthetic
tensors, argument handling, planning.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CONFIG, BackgroundCli, assert_no_traceback, run_cli
from qlorax.artifacts import read_json
from qlorax.config import load_config
from qlorax.cpuid import cpuid_info
from qlorax.errors import ConfigError, QloraxError
from qlorax.executors.emulation import emulator_wrappers, parse_cpus
from qlorax.probe import (
    NATIVE,
    compare_results,
    float_ulps,
    likely_cause,
    parse_batch,
    probe_config,
)
from qlorax.verify import plan_runs


def _qemu_or_skip() -> None:
    """qemu-user is installed by scripts/install_test_services.sh (make test); a machine
    without apt cannot get it, and only there is the live test skipped."""
    if shutil.which("qemu-x86_64") is None:
        if shutil.which("apt-get") is None:
            pytest.skip("qemu-x86_64 is missing and apt-get is unavailable to install qemu-user")
        pytest.fail("qemu-x86_64 is missing: run `bash scripts/install_test_services.sh` (installs qemu-user)")


HOST_VENDOR = cpuid_info()["vendor"]
@pytest.fixture(scope="module")
def probed(probe_started: tuple[Path, BackgroundCli] | None) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    """The session's one live probe (tests/conftest.py: started in the background as the session
    began): the tiny config's first step natively, on Haswell-v4 and on Nehalem-v1, portable."""
    _qemu_or_skip()
    assert probe_started is not None
    out, command = probe_started
    result = command.result(timeout=900)
    assert_no_traceback(result)
    return result, read_json(out / "probe_report.json"), out


def test_probe_haswell_reports_what_the_emulated_child_saw(probed) -> None:
    _, report, out = probed
    assert report["profile"] == "portable" and report["batch"] == {"sequences": 1, "tokens": 16}
    native, haswell = report["processors"][NATIVE], report["processors"]["Haswell-v4"]
    # CPUID of the emulated processor, not the host's /proc/cpuinfo (which QEMU user mode passes through).
    assert haswell["processor"]["source"] == "cpuid" and haswell["processor"]["vendor"] == "GenuineIntel"
    assert "Haswell" in haswell["processor"]["cpu_model"] and "avx2" in haswell["processor"]["cpu_isa_flags"]
    assert haswell["processor"]["emulated"] is True and haswell["processor"]["emulated_cpu"] == "Haswell-v4"
    assert haswell["processor"]["proc_cpuinfo"] == native["processor"]["proc_cpuinfo"]
    assert native["processor"]["emulated"] is False and native["processor"]["vendor"] == HOST_VENDOR
    assert haswell["torch"]["cpu_capability"] == "AVX2" and haswell["validation"]["valid"] is True
    assert haswell["batch_shape"] == [1, 16]
    assert float.fromhex(haswell["grad_norm_bits"]) > 0  # a step with real gradients
    assert (out / "Haswell-v4.safetensors").is_file() and (out / "native.safetensors").is_file()


@pytest.mark.parametrize("cpu", ["Haswell-v4", "EPYC-Rome-v1"])
def test_probe_intel_and_amd_agree_with_native_under_portable(probed, cpu: str) -> None:
    """Issue 23: portable uses only exactly rounded instructions, so an emulated Intel Haswell and
    an emulated AMD EPYC-Rome give the native bits, whatever the host's vendor (QEMU computes
    the approximate rsqrtps/rcpps exactly: it is a fair witness only where none is used, which
    test_exact_math checks). Every tensor: loss, gradients, updated LoRA weights."""
    result, report, out = probed
    emulated = report["processors"][cpu]
    assert emulated["status"] == "agrees", emulated
    assert emulated["comparison"]["tensors_differing"] == [] and emulated["comparison"]["scalars"] == {}
    assert emulated["comparison"]["tensors_compared"] > 50
    assert read_json(out / f"{cpu}.json")["tensor_sha256"] == read_json(out / "native.json")["tensor_sha256"]
    assert emulated["loss_bits"] == report["processors"][NATIVE]["loss_bits"]
    vendor = "AuthenticAMD" if cpu.startswith("EPYC") else "GenuineIntel"
    assert emulated["processor"]["vendor"] == vendor and emulated["processor"]["emulated_cpu"] == cpu
    assert report["all_agree"] is False  # Nehalem-v1 was refused


def test_probe_refuses_a_processor_without_avx2_under_portable(probed) -> None:
    result, report, _ = probed
    nehalem = report["processors"]["Nehalem-v1"]
    assert nehalem["status"] == "refused" and nehalem["exit_code"] == 2
    assert "avx2" in nehalem["message"] and "Nehalem" in nehalem["message"]
    # Refused from CPUID, before torch loaded: the processor facts are there, the torch facts are not.
    assert nehalem["processor"]["source"] == "cpuid" and "avx2" not in nehalem["processor"]["cpu_isa_flags"]
    assert "torch" not in nehalem
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refused" in result.stdout


def test_probe_batch_without_target_tokens_is_refused_natively(tmp_path: Path) -> None:
    """A batch so short that masking leaves no target token would give all-zero gradients
    (agreeing trivially); the native probe says so and nothing is emulated."""
    result = run_cli("probe", "--config", str(TINY_CONFIG), "--batch", "1x32", "--cpu", "native,Haswell-v4",
                     "--output-dir", str(tmp_path / "p"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert_no_traceback(result)
    assert "no processor was emulated" in result.stderr and "target token" in result.stderr
    assert not (tmp_path / "p" / "Haswell-v4.json").exists()


def test_verify_cpu_refuses_nehalem_before_training(tmp_path: Path) -> None:
    _qemu_or_skip()
    out = tmp_path / "verify"
    result = run_cli("verify", "--config", str(TINY_CONFIG), "--profile", "portable", "--runs", "2",
                     "--cpu", "native,Nehalem-v1", "--output-dir", str(out))
    assert result.returncode == 2, result.stdout + result.stderr
    assert_no_traceback(result)
    assert "--cpu Nehalem-v1" in result.stderr and "avx2" in result.stderr
    assert not (out / "run-01").exists()


def test_portable_training_refuses_a_processor_without_avx2_in_the_child(tmp_path: Path) -> None:
    """The train job itself (not only probe/verify's pre-check) reads CPUID before torch loads:
    a portable run started on a processor without AVX2/FMA stops with exit 2, nothing trained."""
    from qlorax.executors.emulation import emulation_env
    from qlorax.launcher import launch_training

    _qemu_or_skip()
    config = load_config(TINY_CONFIG, {"determinism": {"profile": "portable"}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(tmp_path / "child.log", "w", encoding="utf-8") as log:
        code = launch_training(config, run_dir, 1, stdout=log, stderr=log, extra_env=emulation_env("Nehalem-v1"),
                               wrapper=emulator_wrappers(["Nehalem-v1"])["Nehalem-v1"])
    output = (tmp_path / "child.log").read_text()
    assert code == 2, output
    assert "avx2" in output and "fma" in output and "Nehalem-v1" in output and "--profile strict" in output
    assert "Traceback" not in output
    assert not (run_dir / "artifact_summary.json").exists() and not (run_dir / "adapter_model.safetensors").exists()


def test_missing_emulator_is_an_environment_error(tmp_path: Path) -> None:
    result = run_cli("probe", "--cpu", "native,Haswell-v4", "--output-dir", str(tmp_path / "p"),
                     env={"PATH": str(tmp_path)})  # no qemu-x86_64 on this PATH
    assert result.returncode == 3, result.stdout + result.stderr
    assert_no_traceback(result)
    assert "qemu-x86_64 is not installed" in result.stderr and "qemu-user" in result.stderr
    assert not (tmp_path / "p").exists()


def test_unknown_cpu_model_is_bad_input() -> None:
    _qemu_or_skip()
    with pytest.raises(ConfigError, match="Haswel-v4.*not a CPU model"):
        emulator_wrappers(["native", "Haswel-v4"])
    assert emulator_wrappers(["native"]) == {"native": ()}
    wrappers = emulator_wrappers(["native", "Haswell-v4"])
    assert wrappers["Haswell-v4"][1:] == ("-cpu", "Haswell-v4") and wrappers["native"] == ()


# --------------------------------------------------------------------------- static


def test_parse_cpus_and_batch() -> None:
    assert parse_cpus("native, Haswell-v4,native,EPYC-Rome-v1") == ["native", "Haswell-v4", "EPYC-Rome-v1"]
    for bad in ("", " , ", "Haswell v4", "-cpu"):
        with pytest.raises(ConfigError, match="--cpu"):
            parse_cpus(bad)
    assert parse_batch("2x32") == (2, 32) and parse_batch("1X16") == (1, 16)
    for bad in ("2", "0x32", "2x1", "2*32", "x"):
        with pytest.raises(ConfigError, match="--batch"):
            parse_batch(bad)


def test_probe_config_sets_only_the_batch() -> None:
    config = load_config(TINY_CONFIG, {"determinism": {"profile": "portable"}, "data": {"too_long": "reject"}})
    probe = probe_config(config, (2, 32))
    assert (probe.training.batch_size, probe.training.gradient_accumulation_steps) == (2, 1)
    assert (probe.data.max_length, probe.data.too_long) == (32, "truncate")
    assert probe.determinism.profile == "portable" and probe.training.seed == config.training.seed
    assert probe.lora == config.lora and probe.model == config.model


def _record(loss: float, tensors: dict[str, np.ndarray], vendor: str = "GenuineIntel",
            capability: str = "AVX2") -> dict:
    import hashlib

    return {"loss_bits": float(np.float32(loss)).hex(), "grad_norm_bits": (0.5).hex(),
            "tensor_sha256": {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in tensors.items()},
            "processor": {"vendor": vendor, "cpu_model": "host", "cpu_isa_flags": ["avx2", "fma"]},
            "torch": {"cpu_capability": capability}}


def test_compare_results_counts_ulps_per_tensor() -> None:
    rng = np.random.default_rng(0)
    ref = {"grad/a": rng.standard_normal((4, 8)).astype(np.float32),
           "weight/a": rng.standard_normal(16).astype(np.float32)}
    same = {k: v.copy() for k, v in ref.items()}
    assert compare_results(_record(1.5, ref), ref, _record(1.5, same), same)["agree"] is True

    other = {k: v.copy() for k, v in ref.items()}
    bits = other["grad/a"].view(np.int32)
    bits[0, 0] += 3  # three units in the last place, one element
    bits[1, 2] -= 1
    loss = np.float32(1.5)
    next_loss = float(np.nextafter(loss, np.float32(2), dtype=np.float32))
    comparison = compare_results(_record(1.5, ref), ref, _record(next_loss, other), other)
    assert comparison["agree"] is False
    assert comparison["scalars"]["loss_bits"]["ulp_distance"] == 1 and "grad_norm_bits" not in comparison["scalars"]
    assert comparison["tensors_compared"] == 2
    assert comparison["tensors_differing"] == [{"name": "grad/a", "max_ulp_distance": 3, "differing_elements": 2,
                                                "numel": 32}]
    assert comparison["max_ulp_distance"] == 3

    missing = {"grad/a": ref["grad/a"]}
    lost = compare_results(_record(1.5, ref), ref, _record(1.5, missing), missing)
    assert lost["agree"] is False and lost["tensors_differing"][0]["problem"].startswith("missing")


def test_float_ulps_across_zero_and_sign() -> None:
    assert float_ulps((1.0).hex(), (1.0).hex()) == 0
    smallest = float(np.nextafter(np.float32(0), np.float32(1), dtype=np.float32))
    assert float_ulps(smallest.hex(), (-smallest).hex()) == 2
    assert float_ulps((0.0).hex(), (-0.0).hex()) == 0


def test_likely_cause_names_isa_then_vendor() -> None:
    ref = _record(1.0, {})
    assert "ATen kernels DEFAULT vs AVX2" in likely_cause(ref, _record(1.0, {}, capability="DEFAULT"))
    assert "vendor: AuthenticAMD vs GenuineIntel" in likely_cause(ref, _record(1.0, {}, vendor="AuthenticAMD"))
    assert "not explained" in likely_cause(ref, _record(1.0, {}))
    other_model = _record(1.0, {})
    other_model["processor"]["cpu_model"] = "Intel Core Processor (Haswell)"
    assert "processor model: Intel Core Processor (Haswell)" in likely_cause(ref, other_model)


def test_verify_plans_processors_alternating_like_threads(tmp_path: Path) -> None:
    config = load_config(TINY_CONFIG)
    specs = plan_runs(config, tmp_path, 5, [1, 2], ["native", "Haswell-v4"])
    assert [(s.threads, s.cpu) for s in specs] == [(1, "native"), (2, "Haswell-v4"), (1, "native"),
                                                   (2, "Haswell-v4"), (1, "native")]
    assert {s.cpu for s in plan_runs(config, tmp_path, 2, [1])} == {"native"}


def test_verify_cpu_needs_the_local_executor(tmp_path: Path) -> None:
    from qlorax.usecases.verification import verify_many

    config = load_config(TINY_CONFIG)
    with pytest.raises(QloraxError, match="local executor only"):
        verify_many(config, tmp_path / "v", 2, [1], executor="ray", cpus=["native", "Haswell-v4"])
    assert not (tmp_path / "v").exists()


def test_cpuid_reads_this_processor() -> None:
    cpu = cpuid_info()
    assert cpu["source"] == "cpuid" and cpu["vendor"] in ("GenuineIntel", "AuthenticAMD")
    assert cpu["machine"] == "x86_64" and cpu["cpu_model"]
    proc_flags = Path("/proc/cpuinfo").read_text().split("\nflags", 1)[1].split("\n", 1)[0].split()
    for flag in ("avx", "avx2", "fma", "sse4_2", "avx512f"):
        assert (flag in cpu["cpu_isa_flags"]) == (flag in proc_flags), flag
