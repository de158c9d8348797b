"""Resource admission: waits with a message, times out with exit code 3."""

from __future__ import annotations

import time

import pytest

from qlorax.errors import EXIT_RESOURCES, ResourceError
from qlorax.ops.resources import ResourceManager, admit, peak_rss_mb


def _impossible() -> ResourceManager:
    return ResourceManager(
        min_memory_gb=10**6, max_cpu_percent=100, poll_seconds=0.05, cpu_sample_seconds=0.01
    )


def test_check_resources_has_the_guide_keys() -> None:
    status = ResourceManager(min_memory_gb=0, max_cpu_percent=100, cpu_sample_seconds=0.01).check_resources()
    assert {"memory_available_gb", "memory_percent", "cpu_percent", "ready_for_training"} <= status.keys()
    assert status["ready_for_training"] is True and status["memory_available_gb"] > 0


def test_unsatisfiable_wait_times_out_after_saying_why() -> None:
    seen: list[dict] = []
    start = time.monotonic()
    assert _impossible().wait_for_resources(timeout_minutes=0.005, on_wait=seen.append) is False
    assert time.monotonic() - start < 5
    assert seen and seen[0]["ready_for_training"] is False
    assert "available memory" in seen[0]["reasons"][0]


def test_satisfiable_wait_returns_at_once() -> None:
    manager = ResourceManager(min_memory_gb=0, max_cpu_percent=100, poll_seconds=30, cpu_sample_seconds=0.01)
    start = time.monotonic()
    assert manager.wait_for_resources(timeout_minutes=10) is True
    assert time.monotonic() - start < 5


def test_admit_raises_resource_error_with_exit_code_3(capsys) -> None:
    with pytest.raises(ResourceError) as exc_info:
        admit(_impossible(), timeout_minutes=0.005)
    assert exc_info.value.exit_code == EXIT_RESOURCES == 3
    assert "resources unavailable after waiting" in exc_info.value.message
    assert "GiB" in exc_info.value.message
    assert "waiting for resources" in capsys.readouterr().err


def test_cli_exit_code_3(cli) -> None:
    result = cli(
        "resources",
        "check",
        "--min-memory-gb",
        "1000000",
        "--wait-minutes",
        "0.002",
        "--poll-seconds",
        "0.05",
        "--cpu-sample-seconds",
        "0.01",
    )
    assert result.exit_code == 3
    assert "waiting for resources" in result.stderr and "resources unavailable" in result.stderr
    ok = cli(
        "resources",
        "check",
        "--min-memory-gb",
        "0",
        "--max-cpu-percent",
        "100",
        "--cpu-sample-seconds",
        "0.01",
    )
    assert ok.exit_code == 0 and "ready for training" in ok.stdout


def test_thresholds_are_validated() -> None:
    with pytest.raises(ValueError):
        ResourceManager(max_cpu_percent=0)


def test_peak_rss_is_plausible() -> None:
    assert 1 < peak_rss_mb() < 1024 * 1024
