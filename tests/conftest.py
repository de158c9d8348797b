"""Shared fixtures: an isolated qlorax home (the preset is materialised once per session)
and helpers to run the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
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


class BackgroundCli:
    """A `qlorax` command started now in a fresh interpreter; `result()` waits for it. Lets a module
    start a slow command that a later module also needs (one run, shared, overlapping other work)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.args = args
        self.process = subprocess.Popen([sys.executable, "-c", "from qlorax.cli import main; main()", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **(env or {})})
        self._result: subprocess.CompletedProcess[str] | None = None

    def result(self, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        if self._result is None:
            stdout, stderr = self.process.communicate(timeout=timeout)
            self._result = subprocess.CompletedProcess(self.args, self.process.returncode, stdout, stderr)
        return self._result


@pytest.fixture(scope="session")
def tiny_verification(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, BackgroundCli]]:
    """`qlorax verify` of the tiny config, 2 runs of 2 steps, started when first requested (the
    publish and MLflow tests share it). Returns (its output directory, the running command)."""
    out = tmp_path_factory.mktemp("tiny-verification") / "verify"
    command = BackgroundCli("verify", "--config", str(TINY_CONFIG), "--set", "training.max_steps=2",
                            "--set", "training.sample_max_new_tokens=2", "--runs", "2", "--threads", "1",
                            "--output-dir", str(out))
    yield out, command
    if command.process.poll() is None:  # a module failed before waiting for it: stop it (it forwards SIGTERM)
        command.process.terminate()
        command.result(timeout=120)


@pytest.fixture(scope="session")
def default_verification(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`qlorax verify` of the default config, 3 runs at 2, 1 and 2 threads (fresh processes each).
    test_train reads its runs as default training runs (pinned digest, thread invariance, a clean
    run directory); test_verify checks the verification itself. Returns (output dir, result)."""
    out = tmp_path_factory.mktemp("default-verification") / "verify"
    result = run_cli("verify", "--runs", "3", "--threads", "2,1", "--output-dir", str(out))
    return out, result
