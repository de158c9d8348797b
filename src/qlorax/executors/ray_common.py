"""What both Ray paths share: starting (or joining) a cluster, the per-call working
directory on the nodes or on a shared volume, and moving a run's files back to the driver
(the manifest last, so an interrupted copy never looks like a finished run)."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from qlorax import settings
from qlorax.artifacts import write_bytes_atomic
from qlorax.errors import ConfigError, OutputError, QloraxError, ResourceError, condense
from qlorax.layout import CHECKPOINTS_DIR, LOCK, MANIFEST

OBJECT_STORE_BYTES = 200 * 1024 * 1024
BASE_PREFIX = ".qlorax-ray-"


LOOPBACK = "127.0.0.1"


def load_ray(address: str | None) -> Any:
    """Import Ray (a missing one is a user error); confined to loopback when it will start a
    local cluster (no `address`) or join one at a loopback address, and this process has not
    imported it yet (the driver's node address must be the cluster's)."""
    if (not address or _is_loopback_address(address)) and "ray" not in sys.modules:
        settings.confine_ray_to_loopback()
    try:
        import ray
    except ImportError:
        raise QloraxError("--executor ray needs Ray, which is not installed: install qlorax[ray] "
                          "(pip install 'qlorax[ray]')") from None
    return ray


def start_ray(ray: Any, address: str | None, max_threads: int) -> bool:
    """Connect to `address`, or start a quiet local cluster; True when we started it (and must stop it).

    A cluster we start registers its node at 127.0.0.1, so the traffic between its parts stays
    on loopback, and keeps Ray's token authentication on (Ray's default for local clusters):
    with RAY_AUTH_MODE=disabled anyone who can reach its ports could run code as this user
    (CVE-2023-48022), so that is refused. Some of Ray 2.60's listeners still bind every
    interface (docs/promises.md). The local cluster gets max(cores, largest thread count)
    CPUs, so a thread count above the core count oversubscribes exactly as the local
    executor would instead of never scheduling.
    """
    if ray.is_initialized():  # the caller (a notebook, a script) already connected: use that cluster, keep it
        return False
    settings.quiet_ray_usage_stats()  # no usage-stats prompt or network call
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        try:
            ray.init(address=address, **quiet)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
            raise ResourceError(f"--address {address}: cannot connect to the Ray cluster: {condense(str(exc))}",
                                detail=f"{type(exc).__name__}: {exc}") from None
        if ray_auth_mode() != "token":
            print(f"warning: connected to the Ray cluster at {address} without token authentication "
                  f"(RAY_AUTH_MODE={ray_auth_mode()}): anyone who can reach its ports can run code on it "
                  "(CVE-2023-48022). Start it with RAY_AUTH_MODE=token (Ray >= 2.52).", file=sys.stderr, flush=True)
        return False
    if settings.ray_auth_mode_requested() == "disabled":
        raise ConfigError("RAY_AUTH_MODE=disabled: qlorax does not start a Ray cluster without token "
                          "authentication, since anyone who can reach its ports could then run code as this user "
                          "(CVE-2023-48022, \"ShadowRay\"). Unset RAY_AUTH_MODE (Ray turns token authentication on "
                          "for local clusters) or set RAY_AUTH_MODE=token.")
    try:
        ray.init(num_cpus=max(settings.usable_cores(), max_threads), include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, _system_config={"process_group_cleanup_enabled": True},
                 _node_ip_address=LOOPBACK, **quiet)
    except Exception as exc:  # e.g. no room for the object store, ports taken
        raise ResourceError(f"cannot start a local Ray cluster: {condense(str(exc))}",
                            detail=f"{type(exc).__name__}: {exc}") from None
    return True


def _is_loopback_address(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def ray_auth_mode() -> str:
    """How this process authenticates to its Ray cluster: "token" or "disabled" (recorded in
    env.json of a Ray-placed run)."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return "token" if is_token_auth_enabled() else "disabled"


def executor_facts(address: str | None) -> dict[str, str]:
    """What a Ray-placed run records in env.json about its cluster (informational)."""
    return {"executor": "ray", "ray_auth_mode": ray_auth_mode(), "ray_cluster": "address" if address else "local"}


def prepare_shared_base(shared_dir: Path, token: str) -> Path:
    base = Path(shared_dir).resolve() / f"{BASE_PREFIX}{token}"
    try:
        base.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"--shared-dir {shared_dir} is not writable: {exc.strerror or exc}") from None
    return base


def write_files(run_dir: Path, files: dict[str, bytes]) -> None:
    """Write returned files under run_dir, the manifest last (its presence means 'finished')."""
    root = run_dir.resolve()
    for rel in sorted(files, key=lambda name: name == MANIFEST):
        target = (root / rel).resolve()
        if not target.is_relative_to(root):
            raise ValueError(f"refusing a file outside the run directory: {rel!r}")
        write_bytes_atomic(target, files[rel])


def move_files(attempt_dir: Path, run_dir: Path) -> None:
    """Move an attempt's files from the shared dir into run_dir, the manifest last."""
    if not attempt_dir.is_dir():
        raise FileNotFoundError(f"{attempt_dir} does not exist on the driver: is --shared-dir a directory "
                                "that every node and the driver share?")
    for rel in sorted(run_files(attempt_dir), key=lambda name: name == MANIFEST):
        target = run_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(attempt_dir / rel, target)


def run_files(run_dir: Path) -> list[str]:
    """A run directory's result files: not checkpoints/ (resume is local-only), the lock or temp files."""
    found = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir).as_posix()
        if (path.is_file() and rel.split("/", 1)[0] != CHECKPOINTS_DIR and rel != LOCK
                and not path.name.endswith(".tmp")):
            found.append(rel)
    return found
