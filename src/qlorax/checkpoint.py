"""Checkpoints: every piece of training state, stored without pickle, written atomically.

A checkpoint is taken only at an optimizer-step boundary, so no partly accumulated
gradient is ever lost. It holds the LoRA weights, the AdamW state, the scheduler, the
step counter (which is also the position in the data order: batches are a pure function
of seed and step), the metric history, and every RNG state. Tensors go to safetensors,
everything else to JSON; numpy's RNG state is stored as plain integers.

Layout: checkpoints/step-00000020/{state.safetensors, state.json, trace.jsonl,
checkpoint_manifest.json}; written in a temp directory, fsynced, then renamed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorax.artifacts import (
    CHECKPOINTS_DIR,
    _fsync_dir,
    read_json,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)

CHECKPOINT_MANIFEST = "checkpoint_manifest.json"
CHECKPOINT_FORMAT = "qlorax-checkpoint/1"


@dataclass
class CheckpointState:
    """Everything needed to continue a run bit-exactly."""

    step: int
    tensors: dict[str, Any]
    meta: dict[str, Any]
    trace_lines: list[str]


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def capture_rng_states() -> tuple[dict[str, Any], dict[str, Any]]:
    """Python, numpy and torch global RNG states as (tensors, json)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state()}
    meta = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }
    return tensors, meta


def restore_rng_states(tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    import numpy as np
    import torch

    python = meta["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    state = meta["numpy"]
    np.random.set_state((state["kind"], np.array(state["keys"], dtype=np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))
    torch.set_rng_state(tensors["rng.torch"])


def optimizer_to_parts(optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """AdamW state_dict split into tensors (safetensors) and param groups (JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{index}.{key}"] = value.detach().clone().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_parts(optimizer: Any, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, state: CheckpointState, keep: int) -> Path:
    """Write one checkpoint atomically, then prune to the newest `keep`."""
    from safetensors.torch import save_file

    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _step_dir_name(state.step)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        tensors = {name: tensor.contiguous() for name, tensor in state.tensors.items()}
        save_file(tensors, str(staging / "state.safetensors"))
        with open(staging / "state.safetensors", "rb+") as handle:
            os.fsync(handle.fileno())
        write_json_atomic(staging / "state.json", {"format": CHECKPOINT_FORMAT, "step": state.step, **state.meta})
        write_bytes_atomic(staging / "trace.jsonl", "".join(state.trace_lines).encode())
        files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in sorted(staging.iterdir())}
        write_json_atomic(staging / CHECKPOINT_MANIFEST,
                          {"format": CHECKPOINT_FORMAT, "step": state.step, "files": files})
        _fsync_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories, oldest first (temp directories excluded)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def checkpoint_problem(directory: Path) -> str | None:
    """None when every file matches the checkpoint's manifest, else what is wrong."""
    manifest_path = directory / CHECKPOINT_MANIFEST
    try:
        manifest = read_json(manifest_path)
    except FileNotFoundError:
        return "its manifest is missing (partial write)"
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "its manifest is unreadable"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return "its manifest lists no files"
    for name, entry in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            return f"{name} does not match its digest"
    return None


def newest_valid_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose digests match, and warnings about the ones skipped."""
    warnings = []
    for directory in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory, warnings
        warnings.append(f"checkpoint {directory.name} is corrupt or partial ({problem}); using an older one")
    return None, warnings


def load_checkpoint(directory: Path) -> CheckpointState:
    from safetensors.torch import load_file

    meta = read_json(directory / "state.json")
    tensors = load_file(str(directory / "state.safetensors"))
    trace_lines = (directory / "trace.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    step = int(meta.pop("step"))
    meta.pop("format", None)
    return CheckpointState(step=step, tensors=tensors, meta=meta, trace_lines=trace_lines)


def dump_json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"

