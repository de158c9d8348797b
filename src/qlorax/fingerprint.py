"""The environment fingerprint written to env.json: from an allow-list, never the whole environment.

Two runs whose fingerprints differ may legitimately differ in bits (environment drift);
two runs with the same fingerprint that differ reveal nondeterminism.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from qlorax import settings
from qlorax.artifacts import canonical_json, sha256_bytes
from qlorax.container import container_record
from qlorax.cpuid import ISA_FLAGS, cpu_info, cpuid_info

PACKAGES = ("torch", "transformers", "peft", "safetensors", "tokenizers", "numpy", "accelerate", "qlorax")
# Numeric libraries that are optional (quantization, kernels): recorded when installed, since
# their presence or version can change which kernels run and how a base model is quantized.
OPTIONAL_PACKAGES = ("bitsandbytes", "torchao", "gguf", "triton", "intel_extension_for_pytorch", "optimum", "hqq",
                     "auto_gptq", "gptqmodel", "autoawq", "optimum-quanto")
def package_versions() -> dict[str, str | None]:
    """Versions of the core packages (None when missing) and of the optional numeric ones installed."""
    versions: dict[str, str | None] = {}
    for name in (*PACKAGES, *OPTIONAL_PACKAGES):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in PACKAGES:
                versions[name] = None
    return versions


def detect_environment_kind() -> str:
    """native, docker or kubernetes (QLORAX_ENVIRONMENT wins)."""
    configured = settings.environment_label()
    if configured:
        return configured
    if settings.in_kubernetes():
        return "kubernetes"
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        return "docker"
    return "native"


def git_commit() -> str | None:
    """The commit of the qlorax checkout, when running from one."""
    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def build_env_record(profile: str, threads: int, pins: dict[str, str], removed: list[str],
                     torch_facts: dict[str, Any] | None, validation: tuple[bool, list[str]],
                     quantized_base_sha256: str | None = None, *, workers: int = 1,
                     executor: str = "local", executor_facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The env.json content. Only allow-listed facts; `removed` holds variable *names* only.
    A quantized base's digest joins the fingerprint: its bits come from bitsandbytes, so a
    change there is environment drift, not nondeterminism. The world size (data-parallel
    workers) is recorded like the thread count: the bits must not depend on it."""
    cpu = cpu_info()
    emulated_cpu = settings.emulated_cpu()
    if emulated_cpu:
        # Under QEMU user mode /proc/cpuinfo is the host's: the emulated processor is CPUID's.
        emulated = cpuid_info()
        cpu = {**emulated, "cpu_isa_flags": [f for f in ISA_FLAGS if f in emulated["cpu_isa_flags"]],
               "cpu_flags_sha256": None}
    fingerprint: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "packages": package_versions(),
        "profile": profile,
        "threads": threads,
        "workers": workers,
        "executor": executor,
        "environment": detect_environment_kind(),
        "pins": dict(sorted(pins.items())),
        "cpu_model": cpu["cpu_model"],
        "cpu_isa_flags": cpu["cpu_isa_flags"],
        "cpu_flags_sha256": cpu["cpu_flags_sha256"],
        **({"emulated_cpu": emulated_cpu} if emulated_cpu else {}),
    }
    if torch_facts:
        fingerprint.update({k: torch_facts[k] for k in ("torch", "mkl", "onednn", "cpu_capability")})
    if quantized_base_sha256 is not None:
        fingerprint["quantized_base_sha256"] = quantized_base_sha256
    return {
        "environment": fingerprint["environment"],
        "container": container_record(),  # informational: outside the fingerprint
        "profile": profile,
        "threads": threads,
        "workers": workers,
        "executor": executor,
        **({"executor_facts": executor_facts} if executor_facts else {}),  # informational: outside the fingerprint
        "pins": fingerprint["pins"],
        "removed_numeric_variables": removed,
        "fingerprint": fingerprint,
        "fingerprint_sha256": sha256_bytes(canonical_json(fingerprint).encode()),
        "torch": torch_facts,
        "validation": {"valid": validation[0], "messages": validation[1]},
        "git_commit": git_commit(),
    }
