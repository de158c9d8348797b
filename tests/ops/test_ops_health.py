"""Health: in-process checks, the guide's JSON, and the real endpoints of `qlorax serve`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qlorax import __version__
from qlorax.ops.health import HealthChecker, create_app, is_loopback


def _unwritable_dir(tmp_path: Path) -> Path:
    """A path no one can create a file in, not even root: it lies under a regular file."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a regular file\n")
    return blocker / "runs"


def test_healthy_document(tmp_path: Path) -> None:
    document = HealthChecker(tmp_path, min_free_memory_mb=1, min_free_disk_mb=1).check()
    assert document["status"] == "healthy", document
    assert document["version"] == __version__ and document["timestamp"].endswith("Z")
    assert set(document["checks"]) == {
        "determinism",
        "artifact_dir_writable",
        "memory_available",
        "disk_free",
    }
    assert "error" not in document and "failed_checks" not in document
    assert list(tmp_path.iterdir()) == []  # the write probe cleans up


def test_flask_endpoints_healthy_and_unhealthy(tmp_path: Path) -> None:
    good = create_app(HealthChecker(tmp_path, 1, 1)).test_client()
    assert good.get("/health").status_code == 200
    assert good.get("/readyz").status_code == 200
    bad = create_app(HealthChecker(_unwritable_dir(tmp_path), 1, 1)).test_client()
    response = bad.get("/health")
    assert response.status_code == 500
    assert response.json["status"] == "unhealthy"
    assert response.json["failed_checks"] == ["artifact_dir_writable"]
    assert response.json["error"].startswith("artifact_dir_writable:")
    assert bad.get("/readyz").status_code == 503
    assert bad.get("/livez").status_code == 200


def test_memory_and_disk_thresholds(tmp_path: Path) -> None:
    document = HealthChecker(tmp_path, min_free_memory_mb=10**12, min_free_disk_mb=10**12).check()
    assert document["status"] == "unhealthy"
    assert document["failed_checks"] == ["memory_available", "disk_free"]


def test_an_unknown_profile_is_unhealthy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # QLORAX_PROFILE names the default profile (as in the container image); a typo there must show.
    monkeypatch.setenv("QLORAX_PROFILE", "stirct")
    document = HealthChecker(tmp_path, 1, 1).check()
    assert "determinism" in document["failed_checks"], document
    assert "unknown profile 'stirct'" in document["checks"]["determinism"]["detail"]
    monkeypatch.setenv("QLORAX_PROFILE", "portable")
    assert "determinism" not in HealthChecker(tmp_path, 1, 1).check().get("failed_checks", [])


def test_no_torch_import_anywhere_in_ops() -> None:
    code = (
        "import sys\n"
        "import qlorax.cli, qlorax.commands.ops\n"
        "import qlorax.ops.metrics, qlorax.ops.audit, qlorax.ops.cache\n"
        "import qlorax.ops.resources, qlorax.ops.secrets\n"
        "from qlorax.ops.health import HealthChecker, create_app\n"
        "HealthChecker('.', 1, 1).check()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'pickle' not in {m for m in sys.modules if m.startswith('qlorax')}\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_served_endpoints_when_healthy(qlorax_serve, tmp_path: Path) -> None:
    serve = qlorax_serve(artifact_dir=tmp_path / "runs")
    assert serve.health_target.startswith("127.0.0.1:") and serve.metrics_target.startswith("127.0.0.1:")
    status, body = serve.get("/health")
    assert status == 200 and body["status"] == "healthy" and body["version"] == __version__
    assert serve.get("/livez")[0] == 200
    ready_status, ready = serve.get("/readyz")
    assert ready_status == 200, ready
    assert set(ready) == {"status", "timestamp", "version"}  # no failed_checks or error when ready
    assert (ready["status"], ready["version"]) == ("ready", __version__) and ready["timestamp"].endswith("Z")
    assert serve.stop() == 0


def test_served_endpoints_when_artifact_dir_unwritable(qlorax_serve, tmp_path: Path) -> None:
    serve = qlorax_serve(artifact_dir=_unwritable_dir(tmp_path))
    status, body = serve.get("/health")
    assert status == 500
    assert body["status"] == "unhealthy" and "artifact_dir_writable" in body["failed_checks"]
    assert "artifact_dir_writable" in body["error"] and body["timestamp"] and body["version"] == __version__
    ready_status, ready = serve.get("/readyz")
    assert ready_status == 503 and ready["failed_checks"] == body["failed_checks"]
    assert serve.get("/livez")[0] == 200
    assert serve.stop() == 0
