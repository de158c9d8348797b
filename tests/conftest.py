"""Shared fixtures: an isolated qlorax home (the preset is materialised once per session)
and helpers to run the real CLI in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_CONFIG = FIXTURES / "tiny.yaml"
# The real S3 server fixture (`s3_server`, tests/object_store.py) for every test module.
pytest_plugins = ["object_store"]


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


def run_clis(*commands: list[str] | tuple[str, ...], env: dict[str, str] | None = None,
             timeout: float = 900) -> list[subprocess.CompletedProcess[str]]:
    """Several `qlorax` commands at once, each in its own fresh interpreter (as `run_cli`), and
    all of them waited for. Independent runs side by side: each is its own pinned process, so no
    bit depends on the others; on 2 cores their imports and 1-thread phases overlap."""
    started = [BackgroundCli(*args, env=env) for args in commands]
    return [command.result(timeout=timeout) for command in started]


# 4 micro-batches per step: 2 workers own 2 each, 3 workers 2, 1 and 1.
WORLD_CONFIG = ["--config", str(TINY_CONFIG), "--set", "training.gradient_accumulation_steps=4",
                "--set", "training.batch_size=2", "--set", "training.max_steps=12",
                "--set", "training.sample_max_new_tokens=4"]


def deterministic_files(run_dir: Path) -> dict[str, str]:
    """Every deterministic artifact's sha256 (the deterministic digest covers exactly these)."""
    from qlorax.artifacts import load_manifest

    files = load_manifest(run_dir)["files"]
    return {name: entry["sha256"] for name, entry in files.items() if entry["kind"] == "deterministic"}


@pytest.fixture(scope="session")
def world_verification(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`verify` of WORLD_CONFIG with 1, 2, 1 and 3 workers (the data-parallel tests' reference:
    run-01 is an uninterrupted one-worker run), shared by the distributed and multi-node tests."""
    out = tmp_path_factory.mktemp("world") / "verify"
    result = run_cli("verify", *WORLD_CONFIG, "--runs", "4", "--threads", "1", "--workers", "1,2,1,3",
                     "--output-dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_no_traceback(result)
    return out

def tiny_verification_textfile(out: Path) -> Path:
    """Where the shared tiny verification writes its Prometheus textfile (outside its output directory)."""
    return out.parent / "qlorax.prom"


@pytest.fixture(scope="session")
def tiny_verification(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, BackgroundCli]]:
    """`qlorax verify` of the tiny config, 2 runs of 2 steps (strict profile, 1 thread), started
    when first requested. Shared by the publish and MLflow tests, the strict half of test_verify's
    strict-vs-portable analysis, and the ops test of its Prometheus textfile (written beside the
    output directory, where `tiny_verification_textfile` says). Returns (its output directory,
    the running command)."""
    out = tmp_path_factory.mktemp("tiny-verification") / "verify"
    command = BackgroundCli("verify", "--config", str(TINY_CONFIG), "--set", "training.max_steps=2",
                            "--set", "training.sample_max_new_tokens=2", "--runs", "2", "--threads", "1",
                            "--output-dir", str(out), "--metrics-textfile", str(tiny_verification_textfile(out)))
    yield out, command
    _stop(command)


def _stop(command: BackgroundCli) -> None:
    if command.process.poll() is None:  # a module failed before waiting for it: stop it (it forwards SIGTERM)
        command.process.terminate()
        command.result(timeout=120)


@pytest.fixture(scope="session")
def default_verification_started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, BackgroundCli]]:
    """`qlorax verify` of the default config, 3 runs at 2, 1 and 2 threads (fresh processes each),
    started in the background as the session begins (`_prelaunch`)."""
    out = tmp_path_factory.mktemp("default-verification") / "verify"
    command = BackgroundCli("verify", "--runs", "3", "--threads", "2,1", "--output-dir", str(out))
    yield out, command
    _stop(command)


@pytest.fixture(scope="session")
def default_verification(default_verification_started: tuple[Path, BackgroundCli]
                         ) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The default verification, finished. test_train reads its runs as default training runs
    (pinned digest, thread invariance, a clean run directory); test_verify checks the verification
    itself. Returns (output dir, result)."""
    out, command = default_verification_started
    return out, command.result()


# test_probe's one live probe: 1 sequence of 16 tokens, every token a target (with the default
# masking so short a batch may hold no completion token): the cheapest step that still has
# gradients everywhere.
PROBE_BATCH = "1x16"


@pytest.fixture(scope="session")
def probe_started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, BackgroundCli] | None]:
    """`qlorax probe` of the tiny config natively, under `qemu-x86_64 -cpu Haswell-v4`, `-cpu
    EPYC-Rome-v1` and `-cpu Nehalem-v1` (portable profile), started in the background as the
    session begins (`_prelaunch`); test_probe reads it. None where qemu-x86_64 is missing (test_probe says why)."""
    if shutil.which("qemu-x86_64") is None:
        yield None
        return
    out = tmp_path_factory.mktemp("probe")
    command = BackgroundCli("probe", "--config", str(TINY_CONFIG), "--profile", "portable", "--batch", PROBE_BATCH,
                            "--set", "data.train_on_inputs=true", "--cpu", "native,Haswell-v4,EPYC-Rome-v1,Nehalem-v1",
                            "--jobs", "2", "--output-dir", str(out))
    yield out, command
    _stop(command)


# The session's longest commands, started in the background as the session begins when a
# collected test needs them: they overlap the many short, mostly single-threaded tests before
# their readers (on 2 cores, one is often idle). Each is its own pinned process: no bit depends
# on what runs beside it.
PRELAUNCHED = ("default_verification_started", "probe_started")


@pytest.fixture(scope="session", autouse=True)
def _prelaunch(request: pytest.FixtureRequest, qlorax_home: Path) -> None:
    needed = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    for name in PRELAUNCHED:
        if name in needed:
            request.getfixturevalue(name)
