"""Other processors, emulated: `qemu-x86_64 -cpu MODEL` as the command prefix of a child.

The local executor runs a verification run under an emulated processor with these
wrappers, and `qlorax probe` runs its first step on each. QEMU computes the approximate
instructions (`rsqrtps`, `rcpps`) exactly, so it stands in for another processor only where
none is used (see docs/determinism.md). Emulation is ~100x slower per step: tiny configs only.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from qlorax.config import QloraxConfig
from qlorax.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_RESOURCES, ConfigError, QloraxError
from qlorax.launcher import run_job_captured
from qlorax.probe import NATIVE
from qlorax.settings import EMULATED_CPU_ENV

EMULATOR = "qemu-x86_64"
_CPU_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_cpus(text: str, option: str = "--cpu") -> list[str]:
    """Comma-separated processor names, in order, without repeats (`native` is the host)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"{option} {text!r}: expected comma-separated processor names, e.g. native,Haswell-v4")
    for name in names:
        if not _CPU_NAME.match(name):
            raise ConfigError(f"{option} {text!r}: {name!r} is not a processor name (letters, digits, . _ -)")
    return list(dict.fromkeys(names))


def emulator_path() -> str:
    """qemu-x86_64 on PATH; exit 3 (environment) naming the package otherwise."""
    path = shutil.which(EMULATOR)
    if path is None:
        raise QloraxError(f"{EMULATOR} is not installed, so no other processor can be emulated: install Debian's "
                          "qemu-user package (sudo apt-get install -y qemu-user) or probe only --cpu native",
                          exit_code=EXIT_RESOURCES)
    return path


def known_cpu_models(qemu: str) -> set[str]:
    """The CPU model names this QEMU emulates (`qemu-x86_64 -cpu help`)."""
    listing = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True, timeout=60, check=False).stdout
    models = set()
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "x86":
            models.add(parts[1])
    return models


def emulator_wrappers(cpus: list[str]) -> dict[str, tuple[str, ...]]:
    """The command prefix per processor: none for native, `qemu-x86_64 -cpu NAME` otherwise
    (checked against the models this QEMU knows: a typo is exit 2, not a silent host run)."""
    emulated = [cpu for cpu in cpus if cpu != NATIVE]
    if not emulated:
        return {NATIVE: ()}
    qemu = emulator_path()
    known = known_cpu_models(qemu)
    unknown = [cpu for cpu in emulated if cpu not in known]
    if unknown:
        examples = ", ".join(m for m in ("Haswell-v4", "Skylake-Client-v4", "EPYC-Rome-v1", "Nehalem-v1") if m in known)
        raise ConfigError(f"--cpu: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a CPU model "
                          f"{EMULATOR} knows (see `{EMULATOR} -cpu help`; e.g. {examples})")
    return {cpu: () if cpu == NATIVE else (qemu, "-cpu", cpu) for cpu in cpus}


def emulation_env(cpu: str) -> dict[str, str]:
    """Tells the child which processor it is emulated as (recorded in env.json / probe results)."""
    return {} if cpu == NATIVE else {EMULATED_CPU_ENV: cpu}


def check_processors(config: QloraxConfig, cpus: list[str]) -> None:
    """Before a long emulated verification: each processor's CPUID, read in a child under its
    emulator (about a second each, no torch), must satisfy the profile; exit 2 otherwise."""
    wrappers = emulator_wrappers(cpus)
    for cpu in cpus:
        done = run_job_captured("probe", {"config": config.canonical()},
                                config.determinism.profile, 1, extra_env=emulation_env(cpu), wrapper=wrappers[cpu])
        if done.returncode != 0:
            errors = [line.removeprefix("error: ") for line in done.stderr.splitlines() if line.startswith("error: ")]
            raise QloraxError(f"--cpu {cpu}: {errors[-1] if errors else 'the processor check failed'}",
                              exit_code=done.returncode if done.returncode == EXIT_BAD_INPUT else EXIT_CHECK_FAILED)
