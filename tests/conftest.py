"""Shared fixtures: an isolated qlorax home (the preset is materialised once per session)
and helpers to run the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_CONFIG = FIXTURES / "tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def qlorax_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = Path(os.environ.get("QLORAX_TEST_HOME") or tmp_path_factory.mktemp("qlorax-home"))
    os.environ["QLORAX_HOME"] = str(home)
    os.environ["QLORAX_CACHE_DIR"] = str(home / "cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Tests that prove reproducibility must really train: the cache is off unless a test turns it on.
    os.environ["QLORAX_CACHE"] = "off"
    return home


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `qlorax ARGS` exactly as a user would (fresh interpreter, real exit code)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", "from qlorax.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
