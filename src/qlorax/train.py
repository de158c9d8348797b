"""The training recipe: one explicit loop, readable top to bottom.

Runs inside the child process that the launcher started with the determinism pins in
its environment. Order of events:

  1. determinism flags and seeds       5. optimizer, scheduler (and resume from a checkpoint)
  2. base model + tokenizer            6. the loop: accumulate, clip, step, trace, eval, checkpoint
  3. data: tokenize, mask, split       7. final eval, artifacts, manifest (written last)
  4. LoRA wrap (seeded init stream)

Separate RNG streams: LoRA init (seeded just before wrapping), dropout (torch's global
generator, seeded just before the loop and saved in checkpoints) and data order (a
torch.Generator per epoch, seeded from seed and epoch, so the batches of any step are a
pure function of the step: resuming needs no replay).
"""

from __future__ import annotations

import math
import os
import platform
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qlorax import __version__
from qlorax.artifacts import (
    pretty_json,
    write_bytes_atomic,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from qlorax.checkpoint import (
    CheckpointState,
    capture_rng_states,
    dump_json_line,
    load_checkpoint,
    newest_valid_checkpoint,
    optimizer_from_parts,
    optimizer_to_parts,
    restore_rng_states,
    save_checkpoint,
)
from qlorax.config import QloraxConfig
from qlorax.data import (
    IGNORE_INDEX,
    Dataset,
    TokenizedExample,
    bundled_path,
    read_data_file,
    tokenize_records,
)
from qlorax.determinism import DeterministicConfig, derive_seed, torch_fingerprint
from qlorax.errors import EXIT_SIGINT, EXIT_SIGTERM, DataError
from qlorax.fingerprint import build_env_record
from qlorax.model import load_base_model, resolve_base_model, wrap_with_lora
from qlorax.ops.resources import peak_rss_mb

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass
class TrainingJob:
    """What the launcher hands the child process."""

    config: QloraxConfig
    output_dir: Path
    threads: int
    resume: bool = False
    removed_env: list[str] = field(default_factory=list)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written and we exit with `exit_code`."""

    def __init__(self, exit_code: int, step: int):
        super().__init__(f"interrupted at step {step}")
        self.exit_code = exit_code
        self.step = step


class _StopFlag:
    """Signal handlers only set a flag; the loop finishes the current step, then stops."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum


# --------------------------------------------------------------------------- batching


def micro_batch_indices(num_examples: int, batch_size: int, seed: int, micro_batch: int) -> list[int]:
    """Example indices of the `micro_batch`-th micro-batch of the infinite, epoch-shuffled stream."""
    import torch

    per_epoch = num_examples // batch_size
    epoch, position = divmod(micro_batch, per_epoch)
    generator = torch.Generator().manual_seed(derive_seed(seed, f"data_order:{epoch}"))
    order = torch.randperm(num_examples, generator=generator)
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def summed_token_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Sum of next-token cross-entropy over labelled tokens (averaged by the caller)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    shifted_labels = batch["labels"][:, 1:].reshape(-1)
    return F.cross_entropy(shifted_logits.float(), shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def target_tokens(batch: dict[str, Any]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def evaluate(model: Any, examples: list[TokenizedExample], batch_size: int, pad_id: int) -> tuple[float, int]:
    """Token-weighted mean loss over the eval split (dropout off)."""
    import torch

    if not examples:
        return float("nan"), 0
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            total += float(summed_token_loss(model, batch))
            tokens += target_tokens(batch)
    model.train()
    return total / max(tokens, 1), tokens


def lora_digest(model: Any) -> str:
    """SHA-256 of every trainable tensor's bytes, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def linear_schedule(warmup: int, total: int):
    """LR multiplier: linear warmup to 1, then linear decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _bits(value: float) -> str:
    return float(value).hex()


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class RunLog:
    """train.log (informational) plus the console; flushed per line so a crash keeps it."""

    def __init__(self, path: Path):
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    def write(self, message: str) -> None:
        self.handle.write(f"{_utc_now()} {message}\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


@dataclass
class TrainingProgress:
    """What the loop has accumulated so far; saved in every checkpoint, restored on resume."""

    step: int = 0
    trace_lines: list[str] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    recent_losses: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    first_loss: float | None = None


def save_training_state(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, progress: TrainingProgress,
                        accumulation: int, keep: int) -> None:
    """Checkpoint at an optimizer-step boundary: weights, AdamW, schedule, RNGs, progress."""
    tensors, rng_meta = capture_rng_states()
    optimizer_tensors, optimizer_meta = optimizer_to_parts(optimizer)
    tensors.update(optimizer_tensors)
    tensors.update({f"param.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    save_checkpoint(run_dir, CheckpointState(step=progress.step, tensors=tensors, trace_lines=progress.trace_lines,
                                             meta={
        "optimizer": optimizer_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta,
        "eval_history": progress.eval_history, "recent_losses": progress.recent_losses,
        "tokens_seen": progress.tokens_seen, "first_loss": progress.first_loss,
        # Where the data stream stands: the next micro-batch to draw (batches are a pure
        # function of seed and this index, so resuming needs no replay).
        "next_micro_batch": progress.step * accumulation,
    }), keep=keep)


def restore_training_state(run_dir: Path, model: Any, optimizer: Any, scheduler: Any,
                           log: RunLog) -> TrainingProgress | None:
    """Load the newest checkpoint whose digests match (warning about any skipped) into the
    model, optimizer, scheduler and RNGs; None when there is none (train from scratch)."""
    import torch

    checkpoint_dir, warnings = newest_valid_checkpoint(run_dir)
    for warning in warnings:
        log.write(f"warning: {warning}")
        print(f"warning: {warning}", flush=True)
    if checkpoint_dir is None:
        return None
    state = load_checkpoint(checkpoint_dir)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.tensors.items():
            if name.startswith("param."):
                named[name[len("param."):]].copy_(value)
    optimizer_from_parts(optimizer, state.tensors, state.meta["optimizer"])
    scheduler.load_state_dict(state.meta["scheduler"])
    restore_rng_states(state.tensors, state.meta["rng"])
    log.write(f"resumed from {checkpoint_dir.name}")
    print(f"resuming from checkpoint {checkpoint_dir.name} (step {state.step})", flush=True)
    return TrainingProgress(step=state.step, trace_lines=state.trace_lines, eval_history=state.meta["eval_history"],
                            recent_losses=state.meta["recent_losses"], tokens_seen=state.meta["tokens_seen"],
                            first_loss=state.meta["first_loss"])


# --------------------------------------------------------------------------- the run


def run_training(job: TrainingJob, progress: Any = None) -> dict[str, Any]:
    """Train one LoRA adapter and write the run directory; returns results.json content."""
    import torch

    cfg = job.config
    tcfg = cfg.training
    run_dir = job.output_dir
    started_at, wall_start = _utc_now(), time.perf_counter()
    stop = _StopFlag()
    stop.install()

    # 1. Determinism: flags, threads, seeds; check the launcher's pins took effect.
    DeterministicConfig.setup_deterministic_environment(tcfg.seed, cfg.determinism.profile, job.threads)
    validation = DeterministicConfig.validate_deterministic_setup()
    log = RunLog(run_dir / "train.log")
    log.write(f"qlorax {__version__} training into {run_dir.name}; profile={cfg.determinism.profile} "
              f"threads={job.threads} config_hash={cfg.config_hash()}")

    _record_or_check_config(run_dir, cfg, job.resume)

    # 2. Base model and tokenizer, through from_pretrained.
    base = resolve_base_model(cfg.model)
    tokenizer, model = load_base_model(base, cfg.model)

    # 3. Data: validate, tokenize, mask prompts, split.
    data = tokenize_records(read_data_file(cfg.data), cfg.data, tokenizer, tcfg.seed)
    if len(data.train) < tcfg.batch_size:
        raise DataError(f"{cfg.data.path}: {len(data.train)} training examples after the eval split, fewer than "
                        f"training.batch_size={tcfg.batch_size}")

    # 4. LoRA, initialised from its own stream.
    model = wrap_with_lora(model, cfg.lora, derive_seed(tcfg.seed, "lora_init"), base.stable_id)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    # 5. Optimizer and schedule.
    optimizer = torch.optim.AdamW(trainable, lr=tcfg.learning_rate, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                                  eps=tcfg.adam_epsilon, weight_decay=tcfg.weight_decay, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(tcfg.warmup_steps, tcfg.max_steps))
    torch.manual_seed(derive_seed(tcfg.seed, "dropout"))

    progress_state = TrainingProgress()
    resumed_from = None
    if job.resume:
        restored = restore_training_state(run_dir, model, optimizer, scheduler, log)
        if restored is not None:
            progress_state, resumed_from = restored, restored.step

    # 6. The loop.
    pad_id = tokenizer.pad_token_id
    accumulation = tcfg.gradient_accumulation_steps
    train_start = time.perf_counter()
    step_tokens_total = 0
    for step in range(progress_state.step + 1, tcfg.max_steps + 1):
        if tcfg.lr_override_from_step is not None and step >= tcfg.lr_override_from_step:
            for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base_lr * scheduler.lr_lambdas[0](step - 1) * tcfg.lr_override_factor
        batches = [
            collate([data.train[i] for i in micro_batch_indices(len(data.train), tcfg.batch_size, tcfg.seed,
                                                                  (step - 1) * accumulation + k)], pad_id)
            for k in range(accumulation)
        ]
        window_tokens = sum(target_tokens(batch) for batch in batches)
        step_input_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
        step_loss = 0.0
        for batch in batches:
            loss = summed_token_loss(model, batch) / max(window_tokens, 1)
            loss.backward()
            step_loss += float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tcfg.max_grad_norm, foreach=False))
        learning_rate = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        progress_state.step = step
        progress_state.tokens_seen += step_input_tokens
        step_tokens_total += step_input_tokens
        if progress_state.first_loss is None:
            progress_state.first_loss = step_loss
        progress_state.recent_losses = [*progress_state.recent_losses, step_loss][-tcfg.logging_window:]
        record = {"step": step, "loss": step_loss, "loss_bits": _bits(step_loss), "lr": learning_rate,
                  "grad_norm": grad_norm, "grad_norm_bits": _bits(grad_norm), "tokens": step_input_tokens,
                  "target_tokens": window_tokens}
        if step % tcfg.trace_every == 0 or step == tcfg.max_steps:
            record["lora_sha256"] = lora_digest(model)
        if step % tcfg.eval_steps == 0 and step != tcfg.max_steps:
            eval_loss, _ = evaluate(model, data.eval, tcfg.eval_batch_size, pad_id)
            record["eval_loss"] = eval_loss
            progress_state.eval_history.append({"step": step, "eval_loss": eval_loss,
                                                "eval_perplexity": _ppl(eval_loss)})
        progress_state.trace_lines.append(dump_json_line(record))

        elapsed = time.perf_counter() - train_start
        rate = step_tokens_total / elapsed if elapsed > 0 else 0.0
        if progress is not None:
            progress(step, tcfg.max_steps, step_loss, rate)
        log.write(f"step {step}/{tcfg.max_steps} loss={step_loss:.4f} lr={learning_rate:.3e} "
                  f"grad_norm={grad_norm:.4f} tokens/s={rate:.0f}")

        if step % tcfg.save_steps == 0 or (stop.signum is not None and step < tcfg.max_steps):
            save_training_state(run_dir, model, optimizer, scheduler, progress_state, accumulation,
                                keep=tcfg.save_total_limit)
        if stop.signum is not None and step < tcfg.max_steps:
            code = EXIT_SIGINT if stop.signum == signal.SIGINT else EXIT_SIGTERM
            log.write(f"stopped by signal {stop.signum} after step {step}; checkpoint written")
            log.close()
            raise Interrupted(code, step)
    training_seconds = time.perf_counter() - train_start

    # 7. Final evaluation and artifacts (deterministic ones first, manifest last).
    eval_loss, eval_tokens = evaluate(model, data.eval, tcfg.eval_batch_size, pad_id)
    eval_history = [*progress_state.eval_history,
                    {"step": tcfg.max_steps, "eval_loss": eval_loss, "eval_perplexity": _ppl(eval_loss)}]
    recent_losses = progress_state.recent_losses
    train_loss = sum(recent_losses) / len(recent_losses)
    results = {
        "config_hash": cfg.config_hash(),
        "seed": tcfg.seed,
        "base_model": {"id": base.stable_id, "digest": base.digest},
        "data": {"path": cfg.data.path, "sha256": data.data_sha256, "format": cfg.data.format},
        "steps": tcfg.max_steps,
        "epochs_completed": round(tcfg.max_steps * accumulation * tcfg.batch_size / len(data.train), 6),
        "train_tokens": progress_state.tokens_seen,
        "eval_tokens": eval_tokens,
        "train_examples": len(data.train),
        "eval_examples": len(data.eval),
        "truncated_examples": data.truncated,
        "initial_train_loss": progress_state.first_loss,
        "final_train_loss": recent_losses[-1],
        "train_loss": train_loss,
        "train_perplexity": _ppl(train_loss),
        "eval_loss": eval_loss,
        "eval_perplexity": _ppl(eval_loss),
        "eval_history": eval_history,
        "trainable_parameters": sum(p.numel() for p in trainable),
    }
    _write_artifacts(run_dir, model, tokenizer, cfg, data, results, progress_state.trace_lines)
    samples = generate_samples(model, tokenizer)
    write_bytes_atomic(run_dir / "samples.jsonl", "".join(dump_json_line(s) for s in samples).encode())

    torch_facts = torch_fingerprint()
    pins = {k: os.environ.get(k, "") for k in sorted(os.environ) if k in _pin_names(cfg, job)}
    write_json_atomic(run_dir / "env.json", build_env_record(
        cfg.determinism.profile, job.threads, pins, job.removed_env, torch_facts, validation))
    write_json_atomic(run_dir / "training_metadata.json", {
        "status": "complete",
        "started_at": started_at,
        "finished_at": _utc_now(),
        "duration_seconds": round(time.perf_counter() - wall_start, 3),
        "training_duration_seconds": round(training_seconds, 3),
        "tokens_per_second": round(step_tokens_total / training_seconds, 1) if training_seconds > 0 else None,
        "peak_memory_mb": round(peak_rss_mb(), 1),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "qlorax_version": __version__,
        "resumed_from_step": resumed_from,
        "base_model_dir": str(base.local_dir),
    })
    log.write(f"finished: train_loss={train_loss:.4f} eval_loss={eval_loss:.4f}")
    log.close()
    write_manifest(run_dir)
    return results


def _record_or_check_config(run_dir: Path, cfg: QloraxConfig, resume: bool) -> None:
    """Keep the config beside the checkpoints so `qlorax resume` needs nothing else, and
    refuse to resume a run with a different config (the result would be neither run)."""
    from qlorax.errors import ConfigError

    path = run_dir / "checkpoints" / "config.json"
    if resume and path.is_file():
        from qlorax.artifacts import read_json

        recorded = read_json(path).get("config_hash")
        if recorded != cfg.config_hash():
            raise ConfigError(f"cannot resume {run_dir}: its checkpoints were made with config {recorded[:12]}, "
                              f"this config is {cfg.config_hash()[:12]}; use the original config or --force")
        return
    write_json_atomic(path, {"config": cfg.canonical(), "config_hash": cfg.config_hash()})


def _pin_names(cfg: QloraxConfig, job: TrainingJob) -> set[str]:
    from qlorax.determinism import pinned_environment

    return set(pinned_environment(cfg.determinism.profile, job.threads))


def _ppl(loss: float) -> float:
    if math.isnan(loss):
        return loss
    return math.exp(min(loss, 700.0))


def _write_artifacts(run_dir: Path, model: Any, tokenizer: Any, cfg: QloraxConfig, data: Dataset,
                     results: dict[str, Any], trace_lines: list[str]) -> None:
    """Adapter and tokenizer via save_pretrained into a temp dir, then moved in atomically."""
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".save.") as staging:
        staging_dir = Path(staging)
        model.save_pretrained(staging_dir, safe_serialization=True, save_embedding_layers=False)
        tokenizer.save_pretrained(staging_dir)
        for name in (*ADAPTER_FILES, *TOKENIZER_FILES):
            source = staging_dir / name
            if source.is_file():
                write_bytes_atomic(run_dir / name, source.read_bytes())
    tcfg = cfg.training
    training_args = {
        **tcfg.model_dump(mode="json"),
        "effective_batch_size": tcfg.batch_size * tcfg.gradient_accumulation_steps,
        "optimizer": "torch.optim.AdamW(foreach=False)",
        "schedule": "linear warmup then linear decay to zero",
        "loss": "token-weighted cross-entropy over the accumulation window",
        "rng_streams": ["lora_init", "dropout", "data_order:<epoch>", "eval_split"],
        "train_on_inputs": cfg.data.train_on_inputs,
        "max_length": cfg.data.max_length,
    }
    write_json_atomic(run_dir / "training_args.json", training_args)
    write_text_atomic(run_dir / "resolved_config.json",
                      pretty_json({"config": cfg.canonical(), "config_hash": cfg.config_hash()}))
    write_json_atomic(run_dir / "results.json", results)
    write_bytes_atomic(run_dir / "trace.jsonl", "".join(trace_lines).encode())


def generate_samples(model: Any, tokenizer: Any, max_new_tokens: int = 24) -> list[dict[str, Any]]:
    """Greedy completions of the fixed evaluation prompts (deterministic: no sampling)."""
    import json

    import torch

    from qlorax.data import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT

    samples = []
    model.eval()
    for line in bundled_path("eval_prompts.jsonl").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        prompt = json.loads(line)
        template = ALPACA_PROMPT_WITH_INPUT if prompt.get("input", "").strip() else ALPACA_PROMPT
        text = template.format(instruction=prompt["instruction"], input=prompt.get("input", ""))
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completion = out[0, len(ids):].tolist()
        samples.append({"id": prompt["id"], "completion": tokenizer.decode(completion, skip_special_tokens=True),
                        "token_ids": completion})
    model.train()
    return samples
