"""Helpers shared by the benchmark scripts (run as `python bench/<script>.py`)."""

from __future__ import annotations

import os
import resource
import shutil
import sys
from pathlib import Path


def qlorax_cli() -> list[str]:
    """The `qlorax` console script of this interpreter's environment (or an equivalent)."""
    script = Path(sys.executable).with_name("qlorax")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("qlorax")
    if found:
        return [found]
    return [sys.executable, "-c", "from qlorax.cli import main; main()"]


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (or stolen by the hypervisor); None off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
