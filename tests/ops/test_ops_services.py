"""scripts/install_test_services.sh: idempotent, and a no-op once the binaries are there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install_test_services.sh"


def test_install_script_is_a_quiet_no_op_when_installed(service_binaries: dict[str, str]) -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], timeout=30).returncode == 0
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert all(shutil.which(name) for name in ("prometheus", "prometheus-pushgateway", "promtool"))
