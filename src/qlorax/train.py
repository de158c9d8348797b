"""The training recipe: set up, loop, finish, each readable top to bottom.

Runs inside the child process that the launcher started with the determinism pins in
its environment. `run_training` is three phases:

  set_up      1. determinism flags and seeds    4. LoRA wrap (seeded init stream)
              2. base model + tokenizer         5. optimizer, schedule
              3. data: tokenize, mask, split    6. resume from a checkpoint
  train_loop  per micro-batch gradients, summed in order, clip, step, trace, eval,
              checkpoint; stop cleanly on a signal
  finish      final eval, artifacts, samples, env/metadata, manifest (written last)

Separate RNG streams: LoRA init (seeded just before wrapping), dropout (qlorax.dropout: each
mask drawn from (seed, micro-batch index, module name), so the masks do not depend on which
worker computes a micro-batch or on where a run was resumed) and data order (a
torch.Generator per epoch, seeded from seed and epoch, so the batches of any step are a
pure function of the step: resuming needs no replay).

With several workers (qlorax.distributed) every worker runs this recipe: each computes its
share of a step's micro-batches, all of them sum every micro-batch's gradient in the same
order and take the same optimizer step; rank 0 alone writes the run directory.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlorax import __version__, layout
from qlorax.artifacts import utc_now, write_manifest
from qlorax.checkpoint import (
    TrainingProgress,
    dump_json_line,
    record_or_check_config,
    restore_training_state,
    save_training_state,
)
from qlorax.data import (
    Dataset,
    collate,
    input_tokens,
    micro_batch_indices,
    read_data_file,
)
from qlorax.determinism import DeterministicConfig, derive_seed
from qlorax.devices.cpu import CPU
from qlorax.distributed import agree_on_start, agree_to_stop, window_gradients
from qlorax.dropout import install_counter_dropout
from qlorax.errors import EXIT_SIGINT, EXIT_SIGTERM, ConfigError, DataError, QloraxError
from qlorax.interrupts import JobInterrupted, exit_code_for, signal_name
from qlorax.loss import evaluate, perplexity, refuse_unpackable_model, summed_token_loss, target_tokens
from qlorax.micro_batches import MicroBatchPool, gradients
from qlorax.model import load_base_model, materialisation_pending, resolve_base_model, wrap_with_lora
from qlorax.optim import DEFAULT_OPTIMIZER, build_optimizer
from qlorax.packed_attention import use_packed_attention
from qlorax.phases import SILENT, Phases
from qlorax.profiles import get_profile
from qlorax.quantization import quantized_base_digest
from qlorax.run_outputs import build_results, write_deterministic_artifacts, write_informational_artifacts
from qlorax.run_state import RunLog, TrainingJob, TrainingState
from qlorax.settings import shared_weights_switched_off
from qlorax.shared_weights import share_base_weights, stored_as_float32
from qlorax.storage.runs import persist_checkpoint
from qlorax.storage.store import RunStore, StorageError
from qlorax.tokenized_cache import tokenized_dataset

# progress(step, max_steps, loss, tokens_per_second), called after every optimizer step.
ProgressCallback = Callable[[int, int, float, float], None]


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written and we exit with `exit_code`."""

    def __init__(self, exit_code: int, step: int):
        super().__init__(f"interrupted at step {step}")
        self.exit_code = exit_code
        self.step = step


class FinishedDespiteSignal(Exception):
    """SIGINT/SIGTERM arrived during the last step or while the results were written: the run
    finished (its manifest is written) and the job still exits 130/143."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum
        self.exit_code = exit_code_for(signum)


class _StopFlag:
    """Before the first step (loading, tokenizing) a signal stops the job at once: there is
    nothing to checkpoint. Once armed (the loop), handlers only set a flag; the loop finishes
    the current step, then stops; after the last step the run finishes and the flag is kept."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        if not self.armed:
            raise JobInterrupted(signum)

    def requested_before(self, step: int, max_steps: int) -> bool:
        """A signal arrived and `step` is not the last one (the last step just finishes)."""
        return self.signum is not None and step < max_steps


# --------------------------------------------------------------------------- digests and schedule


def lora_digest(model: Any) -> str:
    """SHA-256 of every trainable tensor's bytes, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(CPU.tensor_bytes(param))
    return digest.hexdigest()


def build_scheduler(optimizer: Any, name: str, warmup: int, total: int) -> Any:
    """The named schedule from `transformers.get_scheduler`, the very object HF Trainer builds
    (linear warmup from 0 over `warmup` steps, then the named decay over `total`).

    Looked up by name when the optimizer is built, so a test can wrap it from outside."""
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def resolve_steps(tcfg: Any, train_examples: int) -> tuple[int, int]:
    """(optimizer steps, warmup steps) of a run: max_steps or, with num_epochs, enough steps for
    that many passes over the training split, where a pass is train_examples // batch_size
    micro-batches (the data order drops the last partial one) and a step takes
    gradient_accumulation_steps of them. Warmup is warmup_steps or ceil(warmup_ratio * steps)."""
    if tcfg.max_steps is not None:
        total = tcfg.max_steps
    else:
        per_epoch = train_examples // tcfg.batch_size
        total = max(1, math.ceil(tcfg.num_epochs * per_epoch / tcfg.gradient_accumulation_steps))
    warmup = tcfg.warmup_steps if tcfg.warmup_ratio is None else math.ceil(tcfg.warmup_ratio * total)
    if warmup > total:
        raise ConfigError(f"training.warmup_steps ({warmup}) must be at most the run's {total} optimizer steps "
                          f"(training.num_epochs={tcfg.num_epochs} over {train_examples} training examples)")
    return total, warmup


# --------------------------------------------------------------------------- the recipe


def run_training(job: TrainingJob, progress: ProgressCallback | None = None,
                 phases: Phases = SILENT) -> dict[str, Any] | None:
    """Train one LoRA adapter and write the run directory; returns results.json content
    (None on a worker other than rank 0: it trains with the others but writes nothing).
    `phases` says what the run is doing as it goes (qlorax.phases: display and train.log only)."""
    started_at, wall_start = utc_now(), time.perf_counter()
    stop = _StopFlag()
    stop.install()
    state = set_up(job, phases)
    stop.armed = True
    phases.begin("training", f"step {state.progress.step}/{state.total_steps}", total=state.total_steps,
                 done=state.progress.step)
    try:
        train_loop(state, stop, progress, phases)
    finally:
        state.micro_batch_pool.close()
    if not job.world.writes:
        return None
    results = finish(state, started_at, wall_start, phases)
    if stop.signum is not None:  # arrived during the last step or the finish: the run is complete
        raise FinishedDespiteSignal(stop.signum)
    return results


def set_up(job: TrainingJob, phases: Phases = SILENT) -> TrainingState:
    """Everything before the first step, in the order that keeps the RNG streams fixed."""
    cfg, tcfg, run_dir, inputs = job.config, job.config.training, job.output_dir, job.resolved_inputs()
    # 1. Determinism: flags, threads, seeds; check the launcher's pins took effect.
    DeterministicConfig.setup_deterministic_environment(tcfg.seed, cfg.determinism.profile, job.threads)
    validation = DeterministicConfig.validate_deterministic_setup()
    log = RunLog(run_dir / layout.TRAIN_LOG if job.world.writes else None)
    log.write(f"qlorax {__version__} training into {run_dir.name}; profile={cfg.determinism.profile} "
              f"threads={job.threads} workers={job.world.size} config_hash={inputs.config_hash}")
    phases.attach_log(log.write)
    if job.world.writes:
        record_or_check_config(run_dir, cfg, inputs.config_hash, job.resume)

    # 2. Base model and tokenizer, through from_pretrained.
    phases.begin("model", f"{model_verb(cfg.model)} {cfg.model.name_or_path}")
    base = resolve_base_model(cfg.model)
    exact_math = get_profile(cfg.determinism.profile).exact_math
    tokenizer, model = load_base_model(base, cfg.model, exact_math=exact_math)
    quantized_sha256 = quantized_base_digest(model) if cfg.model.quantization != "none" else None
    if tcfg.packing:
        refuse_unpackable_model(model, cfg.model.name_or_path)
        use_packed_attention(model)
    phases.detail(model_size(model, base.local_dir))
    if job.world.size > 1 and cfg.model.quantization == "none" and not shared_weights_switched_off():
        phases.detail(share_with_local_workers(model, base.local_dir, base.digest))

    # 3. Data: validate, tokenize (once per file content), mask prompts, split.
    phases.begin("data", f"tokenizing {cfg.data.path}")
    data = load_data(job, tokenizer, base.digest, phases)

    # 4. LoRA, initialised from its own stream.
    phases.begin("adapter", f"LoRA r={cfg.lora.r}, optimizer and schedule{', resuming' if job.resume else ''}")
    model = wrap_with_lora(model, cfg.lora, derive_seed(tcfg.seed, "lora_init"), base.stable_id)
    dropout = install_counter_dropout(model, derive_seed(tcfg.seed, "dropout"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    # 5. Optimizer and schedule.
    optimizer = build_optimizer(DEFAULT_OPTIMIZER, trainable, tcfg)
    total_steps, warmup_steps = resolve_steps(tcfg, len(data.train))
    scheduler = build_scheduler(optimizer, tcfg.lr_scheduler_type, warmup_steps, total_steps)

    # 6. Resume: weights, AdamW, schedule, RNGs and progress from the newest valid checkpoint.
    state = TrainingState(job=job, log=log, validation=validation, base=base, tokenizer=tokenizer, model=model,
                          dropout=dropout, data=data, trainable=trainable, optimizer=optimizer, scheduler=scheduler,
                          progress=TrainingProgress(), total_steps=total_steps, warmup_steps=warmup_steps,
                          quantized_base_sha256=quantized_sha256)
    if job.storage is not None and job.world.writes:
        state.store = RunStore(job.storage)
    if job.resume:
        restored = restore_training_state(run_dir, model, optimizer, scheduler, log.write, job.world.writes)
        if restored is not None:
            state.progress, state.resumed_from = restored, restored.step
    agree_on_start(job.world, state.progress.step)
    if job.threads > 1 and math.ceil(tcfg.gradient_accumulation_steps / job.world.size) > 1:
        state.micro_batch_pool = MicroBatchPool(job.threads)  # several micro-batches of a step are this worker's
        log.write(f"micro-batches side by side: up to {job.threads} at once, one thread each")
    return state


def load_data(job: TrainingJob, tokenizer: Any, tokenizer_digest: str, phases: Phases) -> Dataset:
    """The run's data file read and checked against its recorded digest, tokenized (or the
    tokenization an earlier run made of the same content: qlorax.tokenized_cache), split."""
    cfg, inputs = job.config, job.resolved_inputs()
    data_file = read_data_file(cfg.data)
    inputs.check_data(cfg.data.path, data_file.sha256)
    data, cached = tokenized_dataset(data_file, cfg.data, tokenizer, tokenizer_digest, cfg.training.seed)
    phases.detail(examples_rate(len(data.train) + len(data.eval), phases) + (", cached" if cached else ""))
    if len(data.train) < cfg.training.batch_size:
        raise DataError(f"{cfg.data.path}: {len(data.train)} training examples after the eval split, fewer than "
                        f"training.batch_size={cfg.training.batch_size}")
    return data


def share_with_local_workers(model: Any, model_dir: str, digest: str) -> str:
    """One copy of the frozen base per machine (qlorax.shared_weights); what was done, in words."""
    if stored_as_float32(Path(model_dir)):
        return "base weights memory-mapped from their float32 file: one copy per machine"
    try:
        return f"{share_base_weights(model, digest) / 2**20:.0f} MiB of base weights shared"
    except OSError as exc:  # an unwritable or full qlorax home: each worker keeps its own copy
        return f"base weights not shared ({exc.strerror or exc}): each worker keeps its own copy"


def train_loop(state: TrainingState, stop: _StopFlag, progress: ProgressCallback | None,
               phases: Phases = SILENT) -> None:
    """Optimizer steps up to max_steps: trace every step, checkpoint every save_steps, and on
    a signal (to any worker) finish the step, checkpoint and raise Interrupted."""
    tcfg, max_steps, world = state.job.config.training, state.total_steps, state.job.world
    start = time.perf_counter()
    for step in range(state.progress.step + 1, max_steps + 1):
        record = optimizer_step(state, step)
        record_step(state, record, phases)
        state.loop_tokens += record[layout.TRACE_TOKENS]
        state.loop_seconds = time.perf_counter() - start
        rate = state.loop_tokens / state.loop_seconds if state.loop_seconds > 0 else 0.0
        if progress is not None and world.writes:
            progress(step, max_steps, record[layout.TRACE_LOSS], rate)
        state.log.write(f"step {step}/{max_steps} loss={record[layout.TRACE_LOSS]:.4f} "
                        f"lr={record[layout.TRACE_LR]:.3e} grad_norm={record[layout.TRACE_GRAD_NORM]:.4f} "
                        f"tokens/s={rate:.0f}")

        agreed = time.perf_counter()
        stopping = agree_to_stop(world, stop.requested_before(step, max_steps))
        state.collective_seconds += time.perf_counter() - agreed
        state.job.check_ownership()  # rank 0's lock; a no-op for the other workers
        if world.writes and (step % tcfg.save_steps == 0 or stopping):
            checkpoint = save_training_state(state.job.output_dir, state.model, state.optimizer, state.scheduler,
                                             state.progress, tcfg.gradient_accumulation_steps,
                                             keep=tcfg.save_total_limit)
            persist_checkpoint_durably(state, checkpoint)
        if stopping:
            state.log.write(f"stopped by signal {stop.signum or 'to another worker'} after step {step}; "
                            "checkpoint written")
            state.log.close()
            raise Interrupted(EXIT_SIGINT if stop.signum == signal.SIGINT else EXIT_SIGTERM, step)
    state.loop_seconds = time.perf_counter() - start


def persist_checkpoint_durably(state: TrainingState, checkpoint: Path) -> None:
    """Copy a checkpoint just written to durable storage (--storage), its manifest last; when the
    store stays unreachable the run stops (exit 3) with the checkpoint kept in the run directory."""
    if state.store is None:
        return
    try:
        upload = persist_checkpoint(state.store, checkpoint, keep=state.job.config.training.save_total_limit)
    except StorageError as exc:
        raise StorageError(f"{exc.message}. The run stopped; {checkpoint.name} is kept in {state.job.output_dir}: "
                           f"`qlorax resume {state.job.output_dir} --storage {state.store.spec.uri}` continues it and "
                           "copies it to storage once the store answers", exit_code=exc.exit_code) from None
    state.uploaded.files += upload.files
    state.uploaded.bytes += upload.bytes
    state.uploaded.seconds += upload.seconds
    state.checkpoints_uploaded += 1
    state.log.write(f"{checkpoint.name} persisted to storage ({upload.bytes} bytes in {upload.seconds:.2f} s)")


def optimizer_step(state: TrainingState, step: int) -> dict[str, Any]:
    """One optimizer step over its accumulation window; returns the step's trace record.

    The loss is token-weighted over the whole window (each micro-batch's summed loss is
    divided by the window's target tokens), so accumulation equals one big batch. This
    worker computes its share of the micro-batches; `window_gradients` gives every worker
    the gradients autograd's accumulation would leave in one process."""
    import torch

    tcfg, world = state.job.config.training, state.job.world
    accumulation, pad_id, train = tcfg.gradient_accumulation_steps, state.tokenizer.pad_token_id, state.data.train
    first = (step - 1) * accumulation
    batches = [collate([train[i] for i in micro_batch_indices(len(train), tcfg.batch_size, tcfg.seed, first + k)],
                       pad_id, packed=tcfg.packing) for k in range(accumulation)]
    window_tokens = sum(target_tokens(batch) for batch in batches)
    real_tokens = sum(input_tokens(batch) for batch in batches)

    def loss_and_gradients(k: int) -> tuple[Any, tuple[Any, ...]]:
        state.dropout.begin(first + k)
        loss = summed_token_loss(state.model, batches[k]) / max(window_tokens, 1)
        return loss, gradients(loss, state.trainable)

    every_loss, collective_seconds = window_gradients(world, state.trainable, accumulation, loss_and_gradients,
                                                      state.micro_batch_pool)
    state.collective_seconds += collective_seconds
    step_loss = 0.0
    for loss in every_loss:
        step_loss += float(loss)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(state.trainable, tcfg.max_grad_norm, foreach=False))
    learning_rate = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return {layout.TRACE_STEP: step, layout.TRACE_LOSS: step_loss, layout.TRACE_LOSS_BITS: float(step_loss).hex(),
            layout.TRACE_LR: learning_rate, layout.TRACE_GRAD_NORM: grad_norm,
            layout.TRACE_GRAD_NORM_BITS: float(grad_norm).hex(), layout.TRACE_TOKENS: real_tokens,
            layout.TRACE_TARGET_TOKENS: window_tokens}


def record_step(state: TrainingState, record: dict[str, Any], phases: Phases = SILENT) -> None:
    """Fold a step into the progress record and the trace: the LoRA digest every
    trace_every steps, an eval every eval_steps (the last step's eval is the final one)."""
    tcfg, progress = state.job.config.training, state.progress
    step, step_loss = record[layout.TRACE_STEP], record[layout.TRACE_LOSS]
    progress.step = step
    progress.tokens_seen += record[layout.TRACE_TOKENS]
    if progress.first_loss is None:
        progress.first_loss = step_loss
    progress.recent_losses = [*progress.recent_losses, step_loss][-tcfg.logging_window:]
    if not state.job.world.writes:  # the trace, its digests and evals are rank 0's
        return
    if step % tcfg.trace_every == 0 or step == state.total_steps:
        record[layout.TRACE_LORA_SHA256] = lora_digest(state.model)
    if step % tcfg.eval_steps == 0 and step != state.total_steps:
        eval_loss, _ = evaluate(state.model, state.data.eval, tcfg.eval_batch_size, state.tokenizer.pad_token_id,
                                on_batch=phases.counter(f"evaluation at step {step}"))
        record[layout.TRACE_EVAL_LOSS] = eval_loss
        progress.eval_history.append({"step": step, "eval_loss": eval_loss, "eval_perplexity": perplexity(eval_loss)})
    progress.trace_lines.append(dump_json_line(record))


def finish(state: TrainingState, started_at: str, wall_start: float, phases: Phases = SILENT) -> dict[str, Any]:
    """Final eval and every artifact: deterministic ones first, informational ones, then the
    manifest last (a directory without it is not a finished run)."""
    job, tcfg = state.job, state.job.config.training
    run_dir = job.output_dir
    phases.begin("evaluation", f"{len(state.data.eval)} held-out examples",
                 total=math.ceil(len(state.data.eval) / tcfg.eval_batch_size))
    eval_loss, eval_tokens = evaluate(state.model, state.data.eval, tcfg.eval_batch_size,
                                      state.tokenizer.pad_token_id, on_batch=phases.advance)
    results = build_results(state, eval_loss, eval_tokens)
    write_deterministic_artifacts(state, results, phases)
    phases.begin("manifest", f"{layout.ENV}, {layout.METADATA}, then every file hashed into {layout.MANIFEST}")
    write_informational_artifacts(state, started_at, wall_start)
    state.log.write(f"finished: train_loss={results['train_loss']:.4f} eval_loss={eval_loss:.4f}")
    phases.detach_log()  # train.log is hashed into the manifest: closed before it
    state.log.close()
    job.check_ownership()  # never a manifest in a directory made again under a lost run
    write_manifest(run_dir)
    phases.end()
    return results


def model_verb(section: Any) -> str:
    """`converting` when the base model is yet to be built into the model cache, else `loading`."""
    try:
        return "converting" if materialisation_pending(section) else "loading"
    except QloraxError:  # a bad model path: resolve_base_model says so, in its own words
        return "loading"


def model_size(model: Any, local_dir: Path) -> str:
    """A loaded base model's size for the display: parameters and bytes on disk (reads only)."""
    parameters = sum(p.numel() for p in model.parameters())
    files = [local_dir] if local_dir.is_file() else [f for f in local_dir.rglob("*") if f.is_file()]
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    return f"{parameters / 1e6:.1f}M parameters, {megabytes:.1f} MB on disk"


def examples_rate(examples: int, phases: Phases) -> str:
    """Examples tokenized and their rate, for the display (the phase started when reading began)."""
    seconds = time.perf_counter() - phases.started
    return f"{examples} examples, {examples / seconds:.0f} examples/s" if seconds > 0 else f"{examples} examples"


