"""Determinism profiles: one record each, in one registry.

A profile says *how* a run computes: which variables the launcher pins before torch loads,
whether torch's deterministic algorithms are on, which ATen kernels it may use and which
processors it supports. Adding a profile (bf16 compute, CUDA) is one entry in `PROFILES`.
Pure Python: the CLI, the health check and the launcher read it without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qlorax import settings
from qlorax.devices import get_device
from qlorax.errors import ConfigError

DEFAULT_PROFILE = "strict"

# Set for every profile: thread counts, hashing, no tokenizer threads (the device adds its own).
_BASE_PINS = {
    "PYTHONHASHSEED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # Idle OpenMP threads stop spinning sooner: no cost on a quiet machine, much less
    # collapse when another process takes a core (bench/bench_wait_policy.py: 1.55x slower
    # beside a one-core hog, against 2.46x at 10000 and 3.9x at libgomp's default; passive
    # waiting is 1.9x slower alone). Never changes a result (the bench checks the bits).
    "GOMP_SPINCOUNT": "1000",
}
# Conditional Numerical Reproducibility, strict: gemm results independent of thread count.
_CNR_PINS = {"MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE", "MKL_CBWR": "AUTO,STRICT",
             "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


@dataclass(frozen=True)
class Profile:
    """One determinism profile: its pins, its torch settings and the processors it supports."""

    name: str
    promise: str
    pins: Mapping[str, str] = field(default_factory=dict)
    deterministic_algorithms: bool = True
    # ATen CPU capabilities the profile accepts (None: whatever the machine has).
    cpu_capabilities: tuple[str, ...] | None = None
    # CPU flags an x86-64 processor must have for the promise to hold.
    required_cpu_flags: tuple[str, ...] = ()
    # The device it trains on (qlorax.devices).
    device: str = "cpu"
    # No approximate instruction anywhere in a step (qlorax.exact_math): oneDNN off, AdamW's
    # fused kernel (exactly rounded sqrt), rotary tables in float64 from add and multiply only.
    exact_math: bool = False

    def environment(self, threads: int) -> dict[str, str]:
        """The variables that must be set before torch loads, for this profile and thread count."""
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        return {**_BASE_PINS, **get_device(self.device).environment, "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads), **self.pins, settings.PROFILE_ENV: self.name,
                settings.THREADS_ENV: str(threads)}

    def unsupported_cpu(self, cpu: Mapping[str, Any]) -> str | None:
        """Why this processor cannot keep the promise (cpu: cpuid.cpu_info()), or None."""
        if cpu.get("machine") != "x86_64":
            return None
        missing = [flag for flag in self.required_cpu_flags if flag not in cpu.get("cpu_isa_flags", [])]
        if missing:
            return (f"profile {self.name} needs a processor with {', '.join(missing)}; "
                    f"{cpu.get('cpu_model', 'this processor')} does not have it")
        return None

    def torch_problems(self, torch_facts: Mapping[str, Any], threads: int) -> list[str]:
        """What differs between the loaded torch (determinism.torch_fingerprint()) and the profile."""
        problems = []
        if self.deterministic_algorithms and not torch_facts.get("deterministic_algorithms"):
            problems.append("torch deterministic algorithms are not enabled")
        if torch_facts.get("num_threads") != threads:
            problems.append(f"torch uses {torch_facts.get('num_threads')} threads, pinned {threads}")
        if self.exact_math and torch_facts.get("mkldnn_enabled"):
            problems.append("oneDNN (mkldnn) is enabled; exact math needs it off")
        capability = torch_facts.get("cpu_capability")
        if self.cpu_capabilities is not None and capability not in self.cpu_capabilities:
            problems.append(f"ATen CPU capability is {capability}, expected {' or '.join(self.cpu_capabilities)}")
        return problems


PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile(
            "strict",
            "bit-identical on one machine (one kind of CPU) for any thread count and process",
            pins=_CNR_PINS,
        ),
        Profile(
            "portable",
            "strict, and the same bits on any x86-64 processor with AVX2 and FMA, Intel or AMD: only "
            "exactly rounded instructions (MKL's COMPATIBLE branch, ATen AVX2 kernels, no oneDNN, no VML)",
            # MKL's COMPATIBLE branch is its one branch for every vendor (AVX2 is Intel's only)
            # and uses no rcpps/rsqrtps; ATen's own AVX2 kernels are exactly rounded. COMPATIBLE
            # has no strict mode (its sums depend on MKL's thread count), so the child runs MKL
            # on one thread (determinism.single_threaded_mkl); ATen's kernels use every thread.
            pins={**_CNR_PINS, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                  "MKL_CBWR": "COMPATIBLE"},
            cpu_capabilities=("AVX2", "DEFAULT"),
            required_cpu_flags=("avx2", "fma"),
            exact_math=True,
        ),
        Profile(
            "off",
            "no promise: seeds only (a baseline for benchmarks)",
            deterministic_algorithms=False,
        ),
    )
}


def get_profile(name: str, source: str = "--profile") -> Profile:
    """The registered profile called `name`; ConfigError (exit 2) naming the choices otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"{source} {name!r}: expected one of {', '.join(PROFILES)}") from None


def profile_name_from_env(explicit: str | None = None) -> str:
    """An explicit choice, else $QLORAX_PROFILE, else the default (strict)."""
    return explicit or settings.profile_from_env() or DEFAULT_PROFILE
