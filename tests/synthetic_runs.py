"""Realistic fake run directories for the analysis, gates and check tests (and the benchmark).

A synthetic run has every file a real `qlorax train` writes (docs/run-directory.md): a real
safetensors adapter written with `safetensors.numpy`, results/trace/env/metadata JSON and a
real manifest from `qlorax.artifacts.write_manifest`. Knobs make one run differ from the
others the way real runs can: different adapter values, a trace that diverges from step k,
a file altered after the manifest, a missing manifest, another environment.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from qlorax.artifacts import canonical_json, pretty_json, sha256_file, write_manifest
from qlorax.layout import MANIFEST

TRACE_FIELDS = ("loss", "grad_norm", "lr", "tokens", "lora_sha256", "truncate")


@functools.lru_cache(maxsize=16)
def adapter_tensors(seed: int = 0, layers: int = 2, hidden: int = 64, rank: int = 8) -> dict[str, np.ndarray]:
    """PEFT-named LoRA tensors (q_proj and v_proj per layer); cached so benchmarks reuse them."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, hidden), dtype=np.float32) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, rank), dtype=np.float32) * 0.01
    for array in tensors.values():
        array.setflags(write=False)
    return tensors


def nudge_ulps(array: np.ndarray, ulps: int) -> np.ndarray:
    """Move every element `ulps` float32 ULPs towards +inf (what a reordered reduction does)."""
    out = array.copy()
    for _ in range(ulps):
        out = np.nextafter(out, np.float32(np.inf), dtype=np.float32)
    return out


def _trace_records(steps: int, trace_every: int, adapter_tag: str, final_adapter_sha: str,
                   diverge_at: int | None, diverge_field: str) -> list[dict[str, Any]]:
    records = []
    for step in range(1, steps + 1):
        diverged = diverge_at is not None and step >= diverge_at
        if diverged and diverge_field == "truncate":
            break
        first = step == diverge_at
        numeric = diverged and diverge_field != "lora_sha256"
        loss = 7.6 * math.exp(-0.04 * step) + 1.5
        grad_norm = 1.2 + 0.3 * math.cos(step)
        lr = 1e-4 * min(1.0, step / 5)
        tokens = 1500 + (step * 37) % 101
        # At the first divergent step only the chosen field differs; afterwards loss and grad norm do.
        if numeric and (not first or diverge_field == "loss"):
            loss = math.nextafter(loss, math.inf)
        if numeric and (not first or diverge_field == "grad_norm"):
            grad_norm = grad_norm * (1 + 1e-6)
        if numeric and first and diverge_field == "lr":
            lr = lr * 2
        if numeric and first and diverge_field == "tokens":
            tokens += 1
        record: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "loss_bits": float.hex(loss),
            "lr": lr,
            "grad_norm": grad_norm,
            "grad_norm_bits": float.hex(grad_norm),
            "tokens": tokens,
        }
        if step % trace_every == 0 or step == steps:
            if diverged:
                record["lora_sha256"] = hashlib.sha256(f"{adapter_tag}:{step}:diverged".encode()).hexdigest()
            elif step == steps:
                record["lora_sha256"] = final_adapter_sha
            else:
                record["lora_sha256"] = hashlib.sha256(f"{adapter_tag}:{step}".encode()).hexdigest()
        records.append(record)
    return records


def _results(records: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    losses = [r["loss"] for r in records] or [float("nan")]
    window = losses[-5:]
    train_loss = sum(window) / len(window)
    eval_loss = train_loss + 0.1
    return {
        "config_hash": hashlib.sha256(b"synthetic-config").hexdigest(),
        "seed": seed,
        "base_model": {"id": "qlorax/tiny-llama", "digest": hashlib.sha256(b"tiny").hexdigest()},
        "steps": len(records),
        "epochs_completed": round(len(records) / 8, 3),
        "train_tokens": sum(r["tokens"] for r in records),
        "eval_tokens": 4000,
        "train_examples": 200,
        "eval_examples": 20,
        "truncated_examples": 0,
        "rejected_examples": 0,
        "initial_train_loss": losses[0],
        "final_train_loss": losses[-1],
        "train_loss": train_loss,
        "train_perplexity": math.exp(train_loss),
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss),
        "eval_history": [
            {"step": len(records), "eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss)}
        ],
    }


def env_document(environment: str = "native", profile: str = "strict", threads: int = 2,
                 torch_version: str = "2.13.0+cpu", cpu_capability: str = "AVX512") -> dict[str, Any]:
    """env.json as the trainer writes it, fingerprint hash included."""
    pins = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": str(threads), "MKL_CBWR": "AUTO,STRICT"}
    fingerprint = {
        "python": "3.11.7", "torch": torch_version, "mkl": "2025.2", "onednn": "3.9",
        "cpu_capability": cpu_capability, "cpu_model": "Synthetic CPU @ 3.0GHz",
        "cpu_flags_sha256": hashlib.sha256(cpu_capability.encode()).hexdigest(),
        "packages": {"transformers": "5.24.0", "peft": "0.21.2"},
        "profile": profile, "threads": threads, "environment": environment, "pins": {},
    }
    return {
        "environment": environment,
        "profile": profile,
        "threads": threads,
        "pins": pins,
        "fingerprint": fingerprint,
        "fingerprint_sha256": hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest(),
        "validation": {"valid": True, "messages": []},
        "git_commit": None,
    }


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def make_run(
    root: Path,
    name: str,
    *,
    seed: int = 42,
    adapter_seed: int = 0,
    perturb_ulps: int = 0,
    perturb_tensors: tuple[str, ...] = ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",),
    layers: int = 2,
    hidden: int = 64,
    rank: int = 8,
    steps: int = 12,
    trace_every: int = 4,
    diverge_at: int | None = None,
    diverge_field: str = "loss",
    environment: str = "native",
    profile: str = "strict",
    threads: int = 2,
    torch_version: str = "2.13.0+cpu",
    cpu_capability: str = "AVX512",
    status: str = "complete",
    manifest: bool = True,
    tamper: str | None = None,
    remove_after_manifest: str | None = None,
    add_after_manifest: str | None = None,
    duration_seconds: float = 21.5,
    peak_memory_mb: float = 612.0,
) -> Path:
    """Write one run directory under root/name and return its path.

    adapter_seed / perturb_ulps: different adapter values (whole adapter / a few ULPs in
    `perturb_tensors`). diverge_at + diverge_field: the trace differs from that step
    ("loss", "grad_norm", "lr", "tokens", "lora_sha256" or "truncate"). tamper: flip one byte
    of that file after the manifest. manifest=False: no artifact_summary.json.
    """
    if diverge_field not in TRACE_FIELDS:
        raise ValueError(f"diverge_field must be one of {TRACE_FIELDS}")
    run = Path(root) / name
    run.mkdir(parents=True, exist_ok=True)

    tensors = dict(adapter_tensors(adapter_seed, layers, hidden, rank))
    if perturb_ulps:
        for tensor_name in perturb_tensors:
            tensors[tensor_name] = nudge_ulps(tensors[tensor_name], perturb_ulps)
    save_file(tensors, str(run / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_sha = sha256_file(run / "adapter_model.safetensors")

    _write(run / "adapter_config.json", pretty_json({
        "base_model_name_or_path": "qlorax/tiny-llama", "peft_type": "LORA", "r": rank, "lora_alpha": 16,
        "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
    }))
    tokenizer = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}
    _write(run / "tokenizer.json", pretty_json(tokenizer))
    _write(run / "tokenizer_config.json", pretty_json({"model_max_length": 512, "pad_token": "<pad>"}))
    _write(run / "training_args.json", pretty_json({
        "seed": seed, "learning_rate": 1e-4, "total_steps": steps, "per_device_batch_size": 4,
    }))
    _write(run / "resolved_config.json", pretty_json({
        "config_hash": hashlib.sha256(b"synthetic-config").hexdigest(), "training": {"seed": seed},
    }))

    # The adapter tag makes intermediate lora digests differ exactly when the adapter does.
    records = _trace_records(steps, trace_every, f"{adapter_seed}:{perturb_ulps}", adapter_sha,
                             diverge_at, diverge_field)
    _write(run / "trace.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    _write(run / "results.json", pretty_json(_results(records, seed)))

    _write(run / "env.json", pretty_json(env_document(environment, profile, threads, torch_version,
                                                      cpu_capability)))
    _write(run / "training_metadata.json", pretty_json({
        "status": status, "started_at": "2026-11-30T02:30:00Z", "finished_at": "2026-11-30T02:30:21Z",
        "duration_seconds": duration_seconds, "training_duration_seconds": duration_seconds * 0.85,
        "peak_memory_mb": peak_memory_mb, "tokens_per_second": 5100.0, "host": f"host-{name}",
        "pid": 1000 + len(name), "qlorax_version": "0.1.0", "resumed_from_step": None,
    }))
    _write(run / "train.log", f"run {name}: {steps} steps\n")
    (run / "checkpoints" / "step-00000004").mkdir(parents=True, exist_ok=True)
    _write(run / "checkpoints" / "step-00000004" / "checkpoint_manifest.json", "{}\n")

    if manifest:
        write_manifest(run)
    if tamper:
        flip_byte(run / tamper)
    if remove_after_manifest:
        (run / remove_after_manifest).unlink()
    if add_after_manifest:
        _write(run / add_after_manifest, "added later\n")
    return run


def flip_byte(path: Path, offset: int | None = None) -> int:
    """XOR one byte (the middle one by default) with 0x01; returns the offset."""
    data = bytearray(Path(path).read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    Path(path).write_bytes(bytes(data))
    return offset


def make_runs(root: Path, names: list[str], **kwargs: Any) -> list[Path]:
    """Several identical runs (same knobs)."""
    return [make_run(root, name, **kwargs) for name in names]


def manifest_path(run: Path) -> Path:
    return Path(run) / MANIFEST
