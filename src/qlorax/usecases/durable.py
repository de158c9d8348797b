"""The parent's side of durable storage (`--storage URI`): open and check the store before
anything trains, put the run's config and input identities there first, bring the newest
stored checkpoint to a machine that continues the run, and copy the finished run last.

The training child persists each checkpoint itself as it writes it (qlorax.train), so a
run that loses its machine keeps every checkpoint that was complete.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qlorax.config import QloraxConfig
from qlorax.errors import OutputError
from qlorax.inputs import ResolvedInputs
from qlorax.ops.secrets import register_secret
from qlorax.storage.runs import (
    CONFIG_REL,
    fetch_newest_checkpoint,
    persist_config,
    persist_finished_run,
    stored_checkpoints,
    stored_run_finished,
)
from qlorax.storage.store import RunStore, StorageError, StorageSpec, resolve_storage


def is_storage_uri(target: str | Path) -> bool:
    """An s3:// URI names a stored run (a plain path is a run directory)."""
    from qlorax.storage.store import is_storage_uri as check

    return check(target)


def open_store(uri: str) -> RunStore:
    """The run's store, checked now (a missing bucket or refused credentials is exit 2, an
    unreachable store exit 3, before anything is written); its secrets registered for scrubbing."""
    spec = resolve_storage(uri)
    for secret in spec.secrets():
        register_secret(secret)
    store = RunStore(spec)
    store.check()
    return store


def start_durably(store: RunStore, run_dir: Path, config: QloraxConfig, inputs: ResolvedInputs,
                  resume: bool) -> str | None:
    """Before the child starts: a stored run with another config is refused; the config and
    input identities are put on storage; when resuming, the newest complete stored
    checkpoint is brought into run_dir. Returns the checkpoint the run will continue from."""
    if store.exists(CONFIG_REL):
        recorded = stored_run_config(store).get("config_hash")
        if recorded != inputs.config_hash:
            raise OutputError(f"--storage {store.spec.uri} holds a run of config {str(recorded)[:12]}, this config "
                              f"is {inputs.config_hash[:12]}: choose another storage prefix, or resume that run "
                              f"with `qlorax resume {store.spec.uri}`")
        if not resume and stored_checkpoints(store):
            raise OutputError(f"--storage {store.spec.uri} already holds checkpoints of this run: continue it with "
                              "--resume (or `qlorax resume URI`), or choose another storage prefix")
    persist_config(store, {"config": config.canonical(), "config_hash": inputs.config_hash}, inputs.to_json())
    if not resume:
        return None
    name, warnings = fetch_newest_checkpoint(store, run_dir)
    for warning in warnings:
        print(f"warning: {warning}", flush=True)
    return name


def finish_durably(store: RunStore, run_dir: Path) -> None:
    """The finished run's files on storage, its manifest last (a failed copy says how to finish it)."""
    try:
        upload = persist_finished_run(store, run_dir)
    except StorageError as exc:
        raise StorageError(f"{exc.message}. The run finished in {run_dir} but its copy on storage is incomplete: "
                           f"`qlorax resume {run_dir} --storage {store.spec.uri}` copies it once the store answers",
                           exit_code=exc.exit_code) from None
    print(f"run copied to {store.spec.uri} ({upload.files} files, {upload.bytes} bytes)", flush=True)


def finished_on_storage(store: RunStore) -> bool:
    return stored_run_finished(store)


def fetch_finished_run(store: RunStore, run_dir: Path) -> None:
    """A run that finished on storage, into run_dir (its manifest last)."""
    from qlorax.storage.runs import fetch_finished_run as fetch

    fetch(store, run_dir)


@contextmanager
def materialised(target: str | Path) -> Iterator[Path]:
    """A run directory to read: `target` itself, or a stored finished run (s3://...) downloaded
    into a temporary directory for the time of the block (for check and analyze)."""
    if not is_storage_uri(target):
        yield Path(target)
        return
    store = open_store(str(target))
    if not stored_run_finished(store):
        raise OutputError(f"{target} holds no finished run (no artifact_summary.json on storage)")
    with tempfile.TemporaryDirectory(prefix="qlorax-stored-run-") as tmp:
        fetch_finished_run(store, Path(tmp))
        yield Path(tmp)


def holds_config(store: RunStore) -> bool:
    return store.exists(CONFIG_REL)


def stored_run_config(store: RunStore) -> dict:
    """The stored run's checkpoints/config.json: its config and config hash."""
    from qlorax.storage.runs import stored_config

    return stored_config(store)


def default_workdir(uri: str) -> Path:
    """Where `qlorax resume URI` continues a stored run without --output-dir: ./<last part of URI>."""
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "run"
    return Path.cwd() / name


def run_storage(root: RunStore, run_name: str) -> StorageSpec:
    """One verification run's durable location under the verification's: URI/run-XX."""
    return StorageSpec(f"{root.spec.uri}/{run_name}", dict(root.spec.s3))


def verification_runs_durably(root: RunStore, config: QloraxConfig, inputs: ResolvedInputs,
                              run_names: list[str]) -> list[StorageSpec]:
    """Each verification run's location, its config put there first (a verification on storage
    is as new as its runs: earlier checkpoints there are refused, like a run's)."""
    specs = []
    for name in run_names:
        spec = run_storage(root, name)
        store = RunStore(spec)
        if stored_checkpoints(store) or stored_run_finished(store):
            raise OutputError(f"--storage {root.spec.uri} already holds {name}: choose another storage prefix")
        persist_config(store, {"config": config.canonical(), "config_hash": inputs.config_hash}, inputs.to_json())
        specs.append(spec)
    return specs
