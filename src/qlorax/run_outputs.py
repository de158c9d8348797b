"""What a finished run writes: results.json, the deterministic artifacts (adapter, tokenizer,
training args, resolved config, trace, samples) and the informational ones (env.json,
training_metadata.json). Called by train.py's finish phase, the manifest after them."""

from __future__ import annotations

import os
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from qlorax import __version__, layout
from qlorax.artifacts import pretty_json, utc_now, write_bytes_atomic, write_json_atomic, write_text_atomic
from qlorax.checkpoint import dump_json_line
from qlorax.data import resolve_data_path
from qlorax.datasource import data_source_record
from qlorax.determinism import pins_in_force, torch_fingerprint
from qlorax.fingerprint import build_env_record
from qlorax.generate import generate_completions, read_prompt_records
from qlorax.loss import perplexity
from qlorax.ops.resources import peak_rss_mb
from qlorax.optim import DEFAULT_OPTIMIZER, optimizer
from qlorax.phases import SILENT, Phases
from qlorax.run_state import TrainingState
from qlorax.saved_configs import normalised_bytes


def build_results(state: TrainingState, eval_loss: float, eval_tokens: int) -> dict[str, Any]:
    """results.json: the run's numbers, all of them deterministic (the base model by its content:
    a stable id and provenance derived from the content digest, never from how it was named)."""
    cfg, tcfg, progress, data = state.job.config, state.job.config.training, state.progress, state.data
    eval_history = [*progress.eval_history,
                    {"step": state.total_steps, "eval_loss": eval_loss, "eval_perplexity": perplexity(eval_loss)}]
    train_loss = sum(progress.recent_losses) / len(progress.recent_losses)
    samples_seen = state.total_steps * tcfg.gradient_accumulation_steps * tcfg.batch_size
    return {
        "config_hash": state.job.resolved_inputs().config_hash,
        "seed": tcfg.seed,
        "base_model": {"id": state.base.stable_id, "digest": state.base.digest,
                       **({"provenance": state.base.provenance} if state.base.provenance else {})},
        "data": {"path": state.job.resolved_inputs().data, "sha256": data.data_sha256,
                 "format": cfg.data.format, "tokenized_sha256": data.tokenized_sha256(),
                 **({"commit": data.data_commit} if data.data_commit else {})},
        "steps": state.total_steps,
        "epochs_completed": round(samples_seen / len(data.train), 6),
        "train_tokens": progress.tokens_seen,
        "eval_tokens": eval_tokens,
        "train_examples": len(data.train),
        "eval_examples": len(data.eval),
        "truncated_examples": data.truncated,
        "initial_train_loss": progress.first_loss,
        "final_train_loss": progress.recent_losses[-1],
        "train_loss": train_loss,
        "train_perplexity": perplexity(train_loss),
        "eval_loss": eval_loss,
        "eval_perplexity": perplexity(eval_loss),
        "eval_history": eval_history,
        "trainable_parameters": sum(p.numel() for p in state.trainable),
    }


def write_deterministic_artifacts(state: TrainingState, results: dict[str, Any], phases: Phases = SILENT) -> None:
    """Adapter and tokenizer (save_pretrained into a temp dir, moved in atomically), training
    args, resolved config, results, trace and greedy samples."""
    cfg, run_dir = state.job.config, state.job.output_dir
    phases.begin("artifacts", "adapter, tokenizer, training args, config, results, trace")
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".save.") as staging:
        staging_dir = Path(staging)
        state.model.save_pretrained(staging_dir, safe_serialization=True, save_embedding_layers=False)
        state.tokenizer.save_pretrained(staging_dir)
        for name in (layout.ADAPTER_WEIGHTS, layout.ADAPTER_CONFIG, *layout.TOKENIZER_FILES):
            source = staging_dir / name
            if source.is_file():
                write_bytes_atomic(run_dir / name, normalised_bytes(name, source.read_bytes()))
    tcfg = cfg.training
    write_json_atomic(run_dir / layout.TRAINING_ARGS, {
        **tcfg.model_dump(mode="json"),
        "effective_batch_size": tcfg.batch_size * tcfg.gradient_accumulation_steps,
        "optimizer": optimizer(DEFAULT_OPTIMIZER).description,
        "schedule": f"transformers.get_scheduler({tcfg.lr_scheduler_type!r}) over total_steps, with "
                    "resolved_warmup_steps of linear warmup from lr 0",
        "total_steps": state.total_steps,
        "resolved_warmup_steps": state.warmup_steps,
        "loss": "token-weighted cross-entropy over the accumulation window",
        "rng_streams": ["lora_init", "dropout:<micro_batch>:<module>", "data_order:<epoch>", "eval_split"],
        "train_on_inputs": cfg.data.train_on_inputs,
        "max_length": cfg.data.max_length,
    })
    inputs = state.job.resolved_inputs()
    write_text_atomic(run_dir / layout.RESOLVED_CONFIG,
                      pretty_json({"config": cfg.portable_form(inputs), "config_hash": inputs.config_hash}))
    write_json_atomic(run_dir / layout.RESULTS, results)
    write_bytes_atomic(run_dir / layout.TRACE, "".join(state.progress.trace_lines).encode())
    prompts = read_prompt_records()
    phases.begin("samples", f"{len(prompts)} greedy completions", total=len(prompts))
    samples = generate_completions(state.model, state.tokenizer, prompts, tcfg.sample_max_new_tokens,
                                   fmt=cfg.data.format, on_sample=phases.advance)
    write_bytes_atomic(run_dir / layout.SAMPLES, "".join(dump_json_line(s) for s in samples).encode())


def write_informational_artifacts(state: TrainingState, started_at: str, wall_start: float) -> None:
    """env.json (where it ran: pins, fingerprint) and training_metadata.json (when, how fast)."""
    job, cfg = state.job, state.job.config
    pins = pins_in_force(cfg.determinism.profile, job.threads)
    write_json_atomic(job.output_dir / layout.ENV, build_env_record(
        cfg.determinism.profile, job.threads, pins, job.removed_env, torch_fingerprint(), state.validation,
        state.quantized_base_sha256, workers=job.world.size, executor=job.executor,
        executor_facts=job.executor_facts))
    write_json_atomic(job.output_dir / layout.METADATA, {
        "status": "complete",
        "started_at": started_at,
        "finished_at": utc_now(),
        "duration_seconds": round(time.perf_counter() - wall_start, 3),
        "training_duration_seconds": round(state.loop_seconds, 3),
        "tokens_per_second": round(state.loop_tokens / state.loop_seconds, 1) if state.loop_seconds > 0 else None,
        "workers": job.world.size,
        "collective_seconds": round(state.collective_seconds, 3),
        "peak_memory_mb": round(peak_rss_mb(), 1),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "qlorax_version": __version__,
        "resumed_from_step": state.resumed_from,
        "base_model_dir": str(state.base.local_dir),
        # How the config named the model: deterministic files name it by content (qlorax.identity).
        "base_model_name_or_path": cfg.model.name_or_path,
        **({"base_model_provenance": state.base.marker_provenance}
           if state.base.marker_provenance and not state.base.provenance else {}),
        "data_path": str(resolve_data_path(cfg.data.path, cfg.data.allow_moving_ref)[0].resolve()),
        "data_source": data_source_record(cfg.data.path, cfg.data.allow_moving_ref),
        "restarts": job.restarts,
        **({"storage": storage_record(state)} if state.store is not None else {}),
    })


def storage_record(state: TrainingState) -> dict[str, Any]:
    """What this process copied to durable storage (informational: sizes and times)."""
    uploaded = state.uploaded
    return {"uri": state.store.spec.uri if state.store else None, "checkpoints_uploaded": state.checkpoints_uploaded,
            "bytes_uploaded": uploaded.bytes,
            "bytes_per_checkpoint": uploaded.bytes // state.checkpoints_uploaded if state.checkpoints_uploaded else 0,
            "upload_seconds": round(uploaded.seconds, 3),
            "upload_share_of_training": round(uploaded.seconds / state.loop_seconds, 4) if state.loop_seconds else None}
