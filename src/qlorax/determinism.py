"""Determinism: the environment pins, seeding, and validation.

Thread pools, MKL's conditional-numerical-reproducibility mode and the instruction set
are fixed when their libraries load, so they must be in the environment *before* torch
is imported: `pinned_environment` computes those variables and the launcher starts a
fresh child process with them. Inside that child, `DeterministicConfig` sets the torch
flags, seeds every RNG and checks that the pins actually took effect.

This module imports torch only inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from collections.abc import Mapping
from typing import Any

from qlorax.profiles import PROFILES, profile_name_from_env
from qlorax.settings import PROFILE_ENV, THREADS_ENV

# Prefixes of variables that change numerics or threading; the launcher removes any the
# user had set, so that only our pins are in force (and recorded).
NUMERIC_ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "ATEN_", "ONEDNN_", "DNNL_", "OPENBLAS_NUM", "GOMP_")
# Kept even though they match a prefix: set by the machine for correctness on some CPUs.
NUMERIC_ENV_KEEP = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def pinned_environment(profile: str, threads: int) -> dict[str, str]:
    """The variables that must be set before torch loads, for a profile and thread count."""
    if profile not in PROFILES:
        raise ValueError(f"unknown determinism profile {profile!r}; expected one of {', '.join(PROFILES)}")
    return PROFILES[profile].environment(threads)


def child_environment(parent: Mapping[str, str], profile: str, threads: int) -> tuple[dict[str, str], list[str]]:
    """The child's environment: the parent's minus any numeric/threading variable, plus our pins.

    Returns the environment and the *names* of the variables that were removed (recorded,
    never their values)."""
    env: dict[str, str] = {}
    removed: list[str] = []
    for key, value in parent.items():
        if key.startswith(NUMERIC_ENV_PREFIXES) and key not in NUMERIC_ENV_KEEP:
            removed.append(key)
            continue
        env[key] = value
    env.update(pinned_environment(profile, threads))
    return env, sorted(removed)


def pinned_profile() -> str:
    """In a child: the profile the launcher pinned (QLORAX_PROFILE, set before Python started)."""
    return os.environ[PROFILE_ENV]


def pins_in_force(profile: str, threads: int) -> dict[str, str]:
    """In a child: the pinned variables as this process sees them (recorded in env.json)."""
    names = pinned_environment(profile, threads)
    return {key: os.environ[key] for key in sorted(names) if key in os.environ}


def validate_environment(env: Mapping[str, str] | None = None) -> tuple[bool, list[str]]:
    """Check that the pins of the profile named in QLORAX_PROFILE are in force (no torch needed)."""
    env = os.environ if env is None else env
    profile = env.get(PROFILE_ENV)
    threads = env.get(THREADS_ENV) or env.get("OMP_NUM_THREADS")
    if profile is None:
        return False, ["QLORAX_PROFILE is not set: this process was not started by the qlorax launcher"]
    if profile not in PROFILES:
        return False, [f"QLORAX_PROFILE={profile!r} is not one of {', '.join(PROFILES)}"]
    try:
        expected = pinned_environment(profile, int(threads or "0"))
    except ValueError as exc:
        return False, [f"thread count not pinned: {exc}"]
    messages = []
    for key, value in expected.items():
        actual = env.get(key)
        if actual != value:
            messages.append(f"{key} should be {value!r} for profile {profile}, found {actual!r}")
    return not messages, messages or [f"profile {profile}: all {len(expected)} pins in force"]


def derive_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed per named RNG stream (lora_init, dropout, data_order, ...)."""
    digest = hashlib.sha256(f"qlorax:{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


class DeterministicConfig:
    """The guide's entry points: set up and validate a deterministic process."""

    @classmethod
    def setup_deterministic_environment(
        cls, seed: int = 42, profile: str | None = None, threads: int | None = None
    ) -> dict[str, str]:
        """Pin the environment (effective for libraries not yet loaded), seed every RNG and,
        if torch is importable, switch it to deterministic algorithms with the pinned threads."""
        chosen = PROFILES[profile_name_from_env(profile)]
        threads = threads or int(os.environ.get(THREADS_ENV) or os.environ.get("OMP_NUM_THREADS") or 1)
        pins = chosen.environment(threads)
        os.environ.update(pins)
        seed_everything(seed)
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a hard dependency
            return pins
        if chosen.deterministic_algorithms:
            torch.use_deterministic_algorithms(True)
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision("highest")  # fp32 matmuls in fp32 (never TF32 or bf16 passes)
        if chosen.exact_math:
            torch.backends.mkldnn.enabled = False  # oneDNN blocks by cache sizes read from CPUID
            single_threaded_mkl()
        else:  # exact math calls no VML kernel (scripts/vml_kernels.py)
            warm_up_vector_math()
        return pins

    @classmethod
    def validate_deterministic_setup(cls) -> tuple[bool, list[str]]:
        """(valid, messages): the pins are in force and, if torch is loaded, its flags match."""
        valid, messages = validate_environment()
        if "torch" in sys.modules and valid:
            problems = PROFILES[os.environ[PROFILE_ENV]].torch_problems(torch_fingerprint(),
                                                                         int(os.environ[THREADS_ENV]))
            if problems:
                valid = False
                messages.extend(problems)
        return valid, messages


def single_threaded_mkl() -> None:
    """MKL on one thread, ATen's own kernels on every pinned one. MKL's COMPATIBLE branch, the one
    every vendor runs, has no strict mode: some of its gemms sum in an order that depends on its
    thread count (measured: the lm_head LoRA's gradient differed at 1 vs 2 threads). torch sets
    MKL's count for the calling thread when that thread enters its first parallel region, so one
    small parallel op comes first; MKL called inside ATen's parallel regions runs on one thread
    anyway. The forward and the CPU backward run on this thread."""
    import ctypes
    from pathlib import Path

    import torch

    torch.zeros(1 << 16).sum()  # ATen's per-thread lazy initialisation, which would set MKL's count again
    try:
        library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        set_local_threads = library.MKL_Set_Num_Threads_Local  # MKL's C entry point (lower case: Fortran's)
    except (OSError, AttributeError):  # a torch built without MKL: nothing to pin
        return
    set_local_threads(ctypes.c_int(1))


def warm_up_vector_math() -> None:
    """Make MKL's vector math (VML) pick its kernels on this thread, before any parallel region:
    oneMKL 2024.2 was reported to run VML's low-accuracy kernel when several threads made their
    first VML call at once (PyTorch issue 188792). 1024 elements: ATen hands VML its chunks from
    OpenMP threads only above its grain size (32768), so these calls stay on this thread."""
    import torch

    x = torch.linspace(0.5, 2.0, 1024)
    for op in (torch.sqrt, torch.exp, torch.log, torch.sin, torch.cos, torch.tanh, torch.erf):
        op(x)
        op(x.double())


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch's global generators (torch only if already imported)."""

    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)


def torch_fingerprint() -> dict[str, Any]:
    """Library and CPU facts that decide the bits (call in the training process)."""
    import torch

    config = torch.__config__.show()
    mkl = next((line.strip() for line in config.splitlines() if "Math Kernel Library" in line), None)
    onednn = next((line.strip() for line in config.splitlines() if "MKL-DNN" in line or "oneDNN" in line), None)
    return {
        "torch": torch.__version__,
        "mkl": mkl,
        "onednn": onednn,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "num_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
