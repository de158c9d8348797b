"""A run's durable copy: the same layout as its run directory, written in an order that never
lets a partial copy pass as a whole one.

1. Before the first step: checkpoints/config.json (the config and its hash) and
   checkpoints/inputs.json (the identities of the model and data), so any machine can start
   or continue the run.
2. Every checkpoint as it is written: its files, then its checkpoint_manifest.json. A stored
   checkpoint counts only when its manifest is there and every file matches it; a
   half-uploaded one is named and the previous one used.
3. The finished run: every file its manifest lists, then the manifest (artifact_summary.json).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qlorax.artifacts import fsync_dir, load_manifest, write_bytes_atomic
from qlorax.checkpoint import checkpoint_problem, checkpoint_root, newest_valid_checkpoint
from qlorax.layout import CHECKPOINT_CONFIG, CHECKPOINT_MANIFEST, CHECKPOINT_PREFIX, CHECKPOINTS_DIR, MANIFEST
from qlorax.storage.store import RunStore

INPUTS_RECORD = "inputs.json"
CONFIG_REL = f"{CHECKPOINTS_DIR}/{CHECKPOINT_CONFIG}"
INPUTS_REL = f"{CHECKPOINTS_DIR}/{INPUTS_RECORD}"


@dataclass
class Upload:
    """What one upload moved: bytes and seconds (training_metadata.json reports them)."""

    files: int = 0
    bytes: int = 0
    seconds: float = 0.0


def persist_config(store: RunStore, config_record: dict, inputs_json: dict) -> None:
    """The run's config record ({"config", "config_hash"}, as checkpoints/config.json holds it)
    and its inputs' identities, before anything trains."""
    import json

    store.put_bytes(CONFIG_REL, json.dumps(config_record, sort_keys=True, indent=2).encode() + b"\n")
    store.put_bytes(INPUTS_REL, json.dumps(inputs_json, sort_keys=True, indent=2).encode() + b"\n")


def persist_checkpoint(store: RunStore, checkpoint_dir: Path, keep: int) -> Upload:
    """Upload one checkpoint (its manifest last), then remove stored ones beyond the newest `keep`."""
    started = time.perf_counter()
    upload = Upload()
    rel_dir = f"{CHECKPOINTS_DIR}/{checkpoint_dir.name}"
    for path in sorted(checkpoint_dir.iterdir(), key=lambda p: p.name == CHECKPOINT_MANIFEST):
        store.put_file(path, f"{rel_dir}/{path.name}")
        upload.files += 1
        upload.bytes += path.stat().st_size
    for old in stored_checkpoints(store)[:-keep]:
        store.delete_dir(f"{CHECKPOINTS_DIR}/{old}")
    upload.seconds = time.perf_counter() - started
    return upload


def stored_checkpoints(store: RunStore) -> list[str]:
    """Names of the checkpoint directories on storage (complete or not), oldest first."""
    names = {rel.split("/")[1] for rel in store.listing(CHECKPOINTS_DIR) if rel.count("/") >= 2}
    return sorted(name for name in names if name.startswith(CHECKPOINT_PREFIX))


def fetch_newest_checkpoint(store: RunStore, run_dir: Path) -> tuple[str | None, list[str]]:
    """Bring the newest complete stored checkpoint into run_dir/checkpoints unless a checkpoint
    as new is already there; (its name or None, warnings about stored ones skipped)."""
    run_dir = Path(run_dir)
    local, _ = newest_valid_checkpoint(run_dir)
    warnings: list[str] = []
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / CHECKPOINT_CONFIG).is_file() and store.exists(CONFIG_REL):
        write_bytes_atomic(root / CHECKPOINT_CONFIG, store.get_bytes(CONFIG_REL))
    for name in reversed(stored_checkpoints(store)):
        if local is not None and local.name >= name:
            return local.name, warnings
        problem = _download_checkpoint(store, name, root)
        if problem is None:
            return name, warnings
        warnings.append(f"stored checkpoint {name} is incomplete or corrupt ({problem}); using an older one")
    return (local.name if local is not None else None), warnings


def _download_checkpoint(store: RunStore, name: str, root: Path) -> str | None:
    """Download one stored checkpoint into a staging dir, check it, rename it into place."""
    rel_dir = f"{CHECKPOINTS_DIR}/{name}"
    if not store.exists(f"{rel_dir}/{CHECKPOINT_MANIFEST}"):
        return "no manifest: a half-finished upload"
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        manifest = read_json_bytes(store.get_bytes(f"{rel_dir}/{CHECKPOINT_MANIFEST}"))
        for file_name in sorted(manifest.get("files", {})):
            if "/" in file_name or file_name.startswith("."):
                return f"its manifest names an unexpected file {file_name!r}"
            try:
                (staging / file_name).write_bytes(store.get_bytes(f"{rel_dir}/{file_name}"))
            except FileNotFoundError:
                return f"{file_name} is missing"
        (staging / CHECKPOINT_MANIFEST).write_bytes(store.get_bytes(f"{rel_dir}/{CHECKPOINT_MANIFEST}"))
        problem = checkpoint_problem(staging)
        if problem is not None:
            return problem
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        fsync_dir(root)
        return None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def read_json_bytes(data: bytes) -> dict:
    """A stored JSON object (a manifest, the config record)."""
    import json

    value = json.loads(data.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def persist_finished_run(store: RunStore, run_dir: Path) -> Upload:
    """Every file the run's manifest lists, then the manifest: a stored run is finished only
    when its manifest is there (the same rule as a local run directory)."""
    started = time.perf_counter()
    manifest = load_manifest(run_dir) or {}
    upload = Upload()
    for rel in sorted(manifest.get("files", {})):
        store.put_file(Path(run_dir) / rel, rel)
        upload.files += 1
        upload.bytes += (Path(run_dir) / rel).stat().st_size
    store.put_file(Path(run_dir) / MANIFEST, MANIFEST)
    upload.seconds = time.perf_counter() - started
    return upload


def stored_run_finished(store: RunStore) -> bool:
    return store.exists(MANIFEST)


def fetch_finished_run(store: RunStore, dest: Path) -> None:
    """Download a finished stored run's files into dest (the manifest last), for check/analyze."""
    manifest = read_json_bytes(store.get_bytes(MANIFEST))
    dest = Path(dest)
    for rel in sorted(manifest.get("files", {})):
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ValueError(f"the stored manifest names a file outside the run: {rel!r}")
        try:
            write_bytes_atomic(dest / rel, store.get_bytes(rel))
        except FileNotFoundError:
            continue  # `check` reports it missing
    write_bytes_atomic(dest / MANIFEST, store.get_bytes(MANIFEST))


def stored_config(store: RunStore) -> dict:
    """checkpoints/config.json on storage ({"config": ..., "config_hash": ...})."""
    return read_json_bytes(store.get_bytes(CONFIG_REL))

