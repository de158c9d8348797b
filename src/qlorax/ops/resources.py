"""Resource admission: start training only when enough memory is free and the CPU is not saturated.

A training run that starts on a loaded machine is slow and may be OOM-killed halfway;
waiting (with a clear message) and then failing with exit code 3 lets a scheduler retry
later. Inside a container, psutil reports the *host's* memory, so the cgroup's own limit
(v2 `memory.max`, v1 `memory.limit_in_bytes`) caps what we count as available.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from qlorax.errors import ResourceError

GIB = 1024**3


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def cgroup_memory_available() -> int | None:
    """Bytes this cgroup may still allocate (limit - usage), or None without a memory limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit = _read_int(Path(limit_file))
        # cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages).
        if limit is None or limit >= 1 << 60:
            continue
        usage = _read_int(Path(usage_file)) or 0
        return max(0, limit - usage)
    return None


class ResourceManager:
    """The guide's ResourceManager, with thresholds as parameters.

    `min_memory_gb`: GiB of available memory required; `max_cpu_percent`: system-wide CPU
    use above which we wait; `poll_seconds`: time between checks while waiting;
    `cpu_sample_seconds`: the window over which CPU use is measured."""

    def __init__(
        self,
        min_memory_gb: float = 8.0,
        max_cpu_percent: float = 80.0,
        poll_seconds: float = 10.0,
        cpu_sample_seconds: float = 1.0,
    ):
        if min_memory_gb < 0 or not 0 < max_cpu_percent <= 100 or poll_seconds <= 0 or cpu_sample_seconds < 0:
            raise ValueError(
                "ResourceManager needs min_memory_gb >= 0, 0 < max_cpu_percent <= 100, poll_seconds > 0"
            )
        self.min_memory_gb = float(min_memory_gb)
        self.max_cpu_percent = float(max_cpu_percent)
        self.poll_seconds = float(poll_seconds)
        self.cpu_sample_seconds = float(cpu_sample_seconds)
        self.last_status: dict[str, Any] | None = None

    def check_resources(self) -> dict[str, Any]:
        """Measure available memory and CPU use; `ready_for_training` says whether both thresholds hold."""
        memory = psutil.virtual_memory()
        available = memory.available
        limited = cgroup_memory_available()
        if limited is not None:
            available = min(available, limited)
        cpu_percent = psutil.cpu_percent(interval=self.cpu_sample_seconds or None)
        available_gb = available / GIB
        reasons = []
        if available_gb < self.min_memory_gb:
            reasons.append(f"available memory {available_gb:.1f} GiB < required {self.min_memory_gb:g} GiB")
        if cpu_percent > self.max_cpu_percent:
            reasons.append(f"CPU use {cpu_percent:.0f}% > allowed {self.max_cpu_percent:g}%")
        status = {
            "memory_available_gb": available_gb,
            "memory_percent": memory.percent,
            "cpu_percent": cpu_percent,
            "ready_for_training": not reasons,
            "min_memory_gb": self.min_memory_gb,
            "max_cpu_percent": self.max_cpu_percent,
            "reasons": reasons,
        }
        self.last_status = status
        return status

    def wait_for_resources(
        self,
        timeout_minutes: float = 30,
        on_wait: Callable[[dict[str, Any]], None] | None = None,
    ) -> bool:
        """Check until ready (True) or `timeout_minutes` have passed (False); checks at least once.

        Before each sleep `on_wait(status)` is called with the status plus `waited_seconds`
        and `timeout_seconds`, so the caller can say what it is waiting for."""
        timeout_seconds = max(0.0, float(timeout_minutes) * 60.0)
        start = time.monotonic()
        while True:
            status = self.check_resources()
            if status["ready_for_training"]:
                return True
            waited = time.monotonic() - start
            remaining = timeout_seconds - waited
            status["waited_seconds"] = waited
            status["timeout_seconds"] = timeout_seconds
            if remaining <= 0:
                return False
            if on_wait is not None:
                on_wait(status)
            time.sleep(min(self.poll_seconds, remaining))


def describe(status: dict[str, Any]) -> str:
    """One line for a human: what is short, and the measured values."""
    why = "; ".join(status.get("reasons") or []) or "resources available"
    return (
        f"{why} (memory available {status['memory_available_gb']:.1f} GiB, "
        f"memory used {status['memory_percent']:.0f}%, CPU {status['cpu_percent']:.0f}%)"
    )


def _print_waiting(status: dict[str, Any]) -> None:
    left = status["timeout_seconds"] - status["waited_seconds"]
    sys.stderr.write(f"qlorax: waiting for resources ({left:.0f}s left): {describe(status)}\n")
    sys.stderr.flush()


def admit(
    manager: ResourceManager,
    timeout_minutes: float,
    on_wait: Callable[[dict[str, Any]], None] | None = _print_waiting,
) -> dict[str, Any]:
    """Wait for resources; return the final status, or raise ResourceError (exit code 3) on time-out."""
    if manager.wait_for_resources(timeout_minutes, on_wait=on_wait):
        assert manager.last_status is not None
        return manager.last_status
    status = manager.last_status or manager.check_resources()
    raise ResourceError(
        f"resources unavailable after waiting {float(timeout_minutes):g} min: {describe(status)}. "
        "Free memory or CPU, lower the thresholds (min memory / max CPU), or allow a longer admission "
        "timeout; a scheduler may retry this run later (exit code 3)."
    )


def peak_rss_mb() -> float:
    """Peak resident memory in MB (MiB) of this process or of its largest finished child, whichever is larger.

    ru_maxrss is KiB on Linux and bytes on macOS; a trained child (the launcher's
    pinned-environment process) shows up under RUSAGE_CHILDREN once it has been waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak = max(own, children)
    divisor = 1024 * 1024 if sys.platform == "darwin" else 1024
    return peak / divisor
