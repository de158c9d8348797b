"""Checkpoints: every piece of training state, stored without pickle, written atomically.

A checkpoint is taken only at an optimizer-step boundary, so no partly accumulated
gradient is ever lost. It holds the LoRA weights, the AdamW state, the scheduler, the
step counter (which is also the position in the data order: batches are a pure function
of seed and step), the metric history, and every RNG state. Tensors go to safetensors,
everything else to JSON; numpy's RNG state is stored as plain integers.

Layout: checkpoints/step-00000020/{state.safetensors, state.json, trace.jsonl,
checkpoint_manifest.json} (names in qlorax.layout); written in a temp directory, fsynced,
then renamed. The second half of this module maps the training loop's state (model,
AdamW, schedule, RNGs, TrainingProgress) onto a checkpoint and back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlorax.artifacts import (
    fsync_dir,
    read_json,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)
from qlorax.devices.base import Device
from qlorax.devices.cpu import CPU
from qlorax.layout import (
    CHECKPOINT_CONFIG,
    CHECKPOINT_FORMAT,
    CHECKPOINT_MANIFEST,
    CHECKPOINT_PREFIX,
    CHECKPOINT_STATE,
    CHECKPOINT_TENSORS,
    CHECKPOINT_TRACE,
    CHECKPOINTS_DIR,
    checkpoint_dir_name,
)

if TYPE_CHECKING:
    from qlorax.config import QloraxConfig


@dataclass
class CheckpointState:
    """Everything needed to continue a run bit-exactly."""

    step: int
    tensors: dict[str, Any]
    meta: dict[str, Any]
    trace_lines: list[str]


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def capture_rng_states(device: Device = CPU) -> tuple[dict[str, Any], dict[str, Any]]:
    """Python, numpy and the device's (torch) RNG states as (tensors, json)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = device.rng_state()
    meta = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }
    return tensors, meta


def restore_rng_states(tensors: dict[str, Any], meta: dict[str, Any], device: Device = CPU) -> None:
    import numpy as np

    python = meta["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    state = meta["numpy"]
    np.random.set_state((state["kind"], np.array(state["keys"], dtype=np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))
    device.restore_rng_state(tensors)


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


_KERNEL_KEYS = ("foreach", "fused")


def refuse_another_kind_of_run(run_dir: Path, checkpoint: str, optimizer: Any, meta: dict[str, Any]) -> None:
    """A checkpoint continues only a run of its own kind: the same dropout stream (masks drawn the
    way this version draws them) and the same AdamW kernel (loading other param groups would
    switch the kernel back). Otherwise the continued run would match neither (exit 2)."""
    from qlorax.errors import ConfigError

    if meta.get("dropout_stream") != DROPOUT_STREAM:
        raise ConfigError(f"cannot resume {run_dir}: {checkpoint} was written by a qlorax before 0.2.4, whose dropout "
                          "masks were drawn another way (torch's generator); this version draws each mask from "
                          "(seed, micro-batch, module), and the continued run would match neither. Resume it with the "
                          "qlorax that wrote it or train it again from the start (--force).")
    wanted = {key: bool(optimizer.param_groups[0].get(key)) for key in _KERNEL_KEYS}
    groups = meta["optimizer"]["param_groups"]
    saved = {key: bool(groups[0].get(key)) for key in _KERNEL_KEYS} if groups else wanted
    if saved != wanted:
        kernel = {True: "fused", False: "single-tensor"}
        raise ConfigError(f"cannot resume {run_dir}: {checkpoint} was written with AdamW's {kernel[saved['fused']]} "
                          f"kernel and this run trains with the {kernel[wanted['fused']]} one (every profile uses the "
                          "fused kernel since 0.2.4); the continued run would match neither. Resume it with the "
                          "qlorax that wrote it or train it again from the start (--force).")


def save_checkpoint(run_dir: Path, state: CheckpointState, keep: int) -> Path:
    """Write one checkpoint atomically, then prune to the newest `keep`."""
    from safetensors.torch import save_file

    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(state.step)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        tensors = {name: tensor.contiguous() for name, tensor in state.tensors.items()}
        save_file(tensors, str(staging / CHECKPOINT_TENSORS))
        with open(staging / CHECKPOINT_TENSORS, "rb+") as handle:
            os.fsync(handle.fileno())
        write_json_atomic(staging / CHECKPOINT_STATE, {"format": CHECKPOINT_FORMAT, "step": state.step, **state.meta})
        write_bytes_atomic(staging / CHECKPOINT_TRACE, "".join(state.trace_lines).encode())
        files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in sorted(staging.iterdir())}
        write_json_atomic(staging / CHECKPOINT_MANIFEST,
                          {"format": CHECKPOINT_FORMAT, "step": state.step, "files": files})
        fsync_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_dir(root)
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
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


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

    meta = read_json(directory / CHECKPOINT_STATE)
    tensors = load_file(str(directory / CHECKPOINT_TENSORS))
    trace_lines = (directory / CHECKPOINT_TRACE).read_text(encoding="utf-8").splitlines(keepends=True)
    step = int(meta.pop("step"))
    meta.pop("format", None)
    return CheckpointState(step=step, tensors=tensors, meta=meta, trace_lines=trace_lines)


def dump_json_line(obj: dict[str, Any]) -> str:
    """One JSONL line as trace.jsonl and samples.jsonl store it (ASCII, sorted keys, no NaN)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"


# --------------------------------------------------------------------------- training state


@dataclass
class TrainingProgress:
    """What the loop has accumulated so far; saved in every checkpoint, restored on resume."""

    step: int = 0
    trace_lines: list[str] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    recent_losses: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    first_loss: float | None = None


# How dropout masks are drawn (qlorax.dropout): SFC64 seeded from (seed, micro-batch index, module
# name), since 0.2.4. "per_micro_batch" (0.2.0-0.2.3): torch's global generator seeded from (seed,
# micro-batch index) before each micro-batch; none: before 0.2.0.
DROPOUT_STREAM = "sfc64:seed,micro_batch,module"


def save_training_state(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, progress: TrainingProgress,
                        accumulation: int, keep: int) -> Path:
    """Checkpoint at an optimizer-step boundary: weights, AdamW, schedule, RNGs, progress."""
    tensors, rng_meta = capture_rng_states()
    optimizer_tensors, optimizer_meta = optimizer_to_parts(optimizer)
    tensors.update(optimizer_tensors)
    tensors.update({f"param.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    meta = {
        "optimizer": optimizer_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta,
        "eval_history": progress.eval_history, "recent_losses": progress.recent_losses,
        "tokens_seen": progress.tokens_seen, "first_loss": progress.first_loss,
        # Where the data stream stands: the next micro-batch to draw (batches are a pure
        # function of seed and this index, so resuming needs no replay).
        "next_micro_batch": progress.step * accumulation,
        "dropout_stream": DROPOUT_STREAM,
    }
    return save_checkpoint(run_dir, CheckpointState(step=progress.step, tensors=tensors,
                                                    trace_lines=progress.trace_lines, meta=meta), keep=keep)


def restore_training_state(run_dir: Path, model: Any, optimizer: Any, scheduler: Any,
                           log: Callable[[str], None], announce: bool = True) -> TrainingProgress | None:
    """Load the newest checkpoint whose digests match (warning about any skipped) into the
    model, optimizer, scheduler and RNGs; None when there is none (train from scratch).
    `log` takes lines for the run's train.log; the console gets them too when `announce`
    (rank 0 of several workers speaks for all of them)."""
    import torch

    checkpoint_dir, warnings = newest_valid_checkpoint(run_dir)
    for warning in warnings:
        log(f"warning: {warning}")
        if announce:
            print(f"warning: {warning}", flush=True)
    if checkpoint_dir is None:
        return None
    state = load_checkpoint(checkpoint_dir)
    refuse_another_kind_of_run(run_dir, checkpoint_dir.name, optimizer, state.meta)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.tensors.items():
            if name.startswith("param."):
                named[name[len("param."):]].copy_(value)
    optimizer_from_parts(optimizer, state.tensors, state.meta["optimizer"])
    scheduler.load_state_dict(state.meta["scheduler"])
    restore_rng_states(state.tensors, state.meta["rng"])
    log(f"resumed from {checkpoint_dir.name}")
    if announce:
        print(f"resuming from checkpoint {checkpoint_dir.name} (step {state.step})", flush=True)
    return TrainingProgress(step=state.step, trace_lines=state.trace_lines, eval_history=state.meta["eval_history"],
                            recent_losses=state.meta["recent_losses"], tokens_seen=state.meta["tokens_seen"],
                            first_loss=state.meta["first_loss"])



def record_or_check_config(run_dir: Path, cfg: QloraxConfig, config_hash: str, resume: bool) -> None:
    """Keep the config beside the checkpoints so `qlorax resume` needs nothing else, and
    refuse to resume a run with a different config (the result would be neither run)."""
    from qlorax.errors import ConfigError

    path = checkpoint_root(run_dir) / CHECKPOINT_CONFIG
    if resume and path.is_file():
        recorded = read_json(path).get("config_hash")
        if recorded != config_hash:
            raise ConfigError(f"cannot resume {run_dir}: its checkpoints were made with config {recorded[:12]}, "
                              f"this config is {config_hash[:12]}; use the original config or --force")
        return
    write_json_atomic(path, {"config": cfg.canonical(), "config_hash": config_hash})
