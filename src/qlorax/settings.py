"""Every environment variable the parent process reads, in one place.

The child process's environment is not here: the launcher writes that contract (what is
pinned before torch loads), and the child reads its pins through `qlorax.determinism`.
Everything else — the homes, the cache switch, the profile, verbosity, the environment
label, endpoints — is read through these functions, so a reader can see at a glance what
the environment can change.

One home: `$QLORAX_HOME` (default `~/.cache/qlorax`) holds `models/` (built presets,
converted GGUF files), `git/` (fetched data repositories), `tokenized/` (tokenized data files),
`shared-weights/` (float32 base weights shared by local workers) and `runs/` (the run cache);
`$QLORAX_CACHE_DIR` moves the run cache alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

PROFILE_ENV = "QLORAX_PROFILE"
VERBOSE_ENV = "QLORAX_VERBOSE"
HOME_ENV = "QLORAX_HOME"
CACHE_DIR_ENV = "QLORAX_CACHE_DIR"
CACHE_SWITCH_ENV = "QLORAX_CACHE"
ENVIRONMENT_ENV = "QLORAX_ENVIRONMENT"
THREADS_ENV = "QLORAX_THREADS"
EMULATED_CPU_ENV = "QLORAX_EMULATED_CPU"
IMAGE_ID_ENV = "QLORAX_IMAGE_ID"
SHARED_WEIGHTS_ENV = "QLORAX_SHARED_WEIGHTS"
TOKENIZE_CACHE_ENV = "QLORAX_TOKENIZE_CACHE"


def environ() -> Mapping[str, str]:
    """The process environment, read-only: for the secret scan, the launcher's base and git."""
    return os.environ


def get(name: str, default: str | None = None) -> str | None:
    """One variable by name (for the few read once, e.g. MLFLOW_EXPERIMENT_NAME)."""
    return os.environ.get(name, default)


def qlorax_home() -> Path:
    """$QLORAX_HOME, else ~/.cache/qlorax."""
    configured = os.environ.get(HOME_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "qlorax"


def models_dir() -> Path:
    return qlorax_home() / "models"


def git_cache_dir() -> Path:
    return qlorax_home() / "git"


def run_cache_dir() -> Path:
    """$QLORAX_CACHE_DIR, else the home's runs/."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else qlorax_home() / "runs"


def cache_switched_off() -> bool:
    """QLORAX_CACHE=off (or 0/false/no) turns the run cache off for every command."""
    return _switched_off(CACHE_SWITCH_ENV)


def shared_weights_switched_off() -> bool:
    """QLORAX_SHARED_WEIGHTS=off: every local worker keeps its own copy of the base weights (no
    float32 copy written to the qlorax home; for a home on a slow disk, and for measuring)."""
    return _switched_off(SHARED_WEIGHTS_ENV)


def tokenized_cache_dir() -> Path | None:
    """Where tokenized data files are kept (qlorax.tokenized_cache): the home's tokenized/, or
    None with QLORAX_TOKENIZE_CACHE=off (tokenize in every run)."""
    return None if _switched_off(TOKENIZE_CACHE_ENV) else qlorax_home() / "tokenized"


def _switched_off(name: str) -> bool:
    return os.environ.get(name, "on").lower() in ("off", "0", "false", "no")


def profile_from_env() -> str | None:
    """$QLORAX_PROFILE when set (an explicit --profile wins over it)."""
    return os.environ.get(PROFILE_ENV) or None


def verbose() -> bool:
    """Whether `qlorax --verbose` (or QLORAX_VERBOSE=1, inherited by the child) asked for detail."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose() -> None:
    """`qlorax --verbose`: this process and every child it starts print upstream detail."""
    os.environ[VERBOSE_ENV] = "1"


def quiet_progress_bars() -> None:
    """No per-tensor tqdm bars from libraries this process loads (read when they import)."""
    os.environ.setdefault("TQDM_DISABLE", "1")


def environment_label() -> str | None:
    """$QLORAX_ENVIRONMENT: what the user calls this environment (native, docker, ...)."""
    return os.environ.get(ENVIRONMENT_ENV) or None


def image_id() -> str | None:
    """$QLORAX_IMAGE_ID: the container image this process runs in, as its launcher named it."""
    return os.environ.get(IMAGE_ID_ENV) or None


def in_kubernetes() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def quiet_ray_usage_stats() -> None:
    """No Ray usage-stats prompt or network call from a Ray this process starts."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def ray_auth_mode_requested() -> str | None:
    """$RAY_AUTH_MODE as the user set it (Ray reads it too): "disabled" turns Ray's token
    authentication off, which qlorax refuses for a cluster it starts."""
    value = os.environ.get("RAY_AUTH_MODE")
    return value.strip().lower() if value else None


def confine_ray_to_loopback() -> None:
    """Before `import ray`: a cluster this process starts takes 127.0.0.1 as its node address,
    and its gcs_server, raylet and agents listen there. Ray reads this once, at import (its
    switch for single-machine clusters; on Linux it only changes the node address Ray picks)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def emulated_cpu() -> str | None:
    """The QEMU CPU model this process runs under, as the launcher recorded it."""
    return os.environ.get(EMULATED_CPU_ENV) or None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def child_threads() -> int:
    """The thread count the launcher pinned for this child (1 when none was)."""
    return int(os.environ.get(THREADS_ENV) or os.environ.get("OMP_NUM_THREADS") or 1)


def usable_cores() -> int:
    """The cores this process may use (its CPU affinity), at least 1."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextlib.contextmanager
def temporary_environ(overrides: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, leave) variables for the duration of a library call that reads
    its credentials only from the environment (MLflow), then restore what was there."""
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update({k: v for k, v in overrides.items() if v is not None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
