"""Helpers shared by the benchmark scripts (run as `python bench/<script>.py`)."""

from __future__ import annotations

import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Any


def qlorax_cli() -> list[str]:
    """The `qlorax` console script of this interpreter's environment (or an equivalent)."""
    script = Path(sys.executable).with_name("qlorax")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("qlorax")
    if found:
        return [found]
    return [sys.executable, "-c", "from qlorax.cli import main; main()"]


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (or stolen by the hypervisor); None off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def lora_workload(cfg: Any) -> tuple[Any, Any, Any]:
    """(tokenizer, LoRA-wrapped model, tokenized data) exactly as qlorax's set_up builds them,
    for the HF Trainer comparisons (imports torch: call in a benchmark child)."""
    from qlorax.data import read_data_file, tokenize_records
    from qlorax.determinism import derive_seed
    from qlorax.model import load_base_model, resolve_base_model, wrap_with_lora

    base = resolve_base_model(cfg.model)
    tokenizer, model = load_base_model(base, cfg.model)
    data = tokenize_records(read_data_file(cfg.data), cfg.data, tokenizer, cfg.training.seed)
    model = wrap_with_lora(model, cfg.lora, derive_seed(cfg.training.seed, "lora_init"), base.stable_id)
    return tokenizer, model, data


def run_matched_hf_trainer(cfg: Any, max_steps: int | None, output_dir: Path,
                           adapter_dir: Path | None = None, world_size: int = 1) -> dict[str, Any]:
    """Train qlorax's workload for `cfg` with HF Trainer + PEFT (`full_determinism`): the same
    model, LoRA init, optimizer, schedule (name, warmup and total steps as qlorax resolves them;
    `max_steps` None: the config's own length), clipping and the loop's exact stream of batches
    (consumed in order). Returns tokens/s of the training loop and what it ran, and saves the
    trained adapter (PEFT's save_pretrained) into `adapter_dir` when given (imports torch: call
    in a benchmark child). `world_size` W > 1: this process is one rank of W under torchrun (DDP
    over gloo); each optimizer step's accumulation micro-batches are dealt out across the ranks
    (accelerate gives rank r the stream's batches r, r+W, ..., as qlorax's workers own them), so
    each rank accumulates accumulation / W; its tokens are its own."""
    import time

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from qlorax.data import collate, micro_batch_indices
    from qlorax.train import resolve_steps

    tcfg = cfg.training
    tokenizer, model, data = lora_workload(cfg)
    total_steps, warmup_steps = resolve_steps(tcfg, len(data.train))
    max_steps = max_steps or total_steps
    stream = [data.train[i] for k in range(max_steps * tcfg.gradient_accumulation_steps)
              for i in micro_batch_indices(len(data.train), tcfg.batch_size, tcfg.seed, k)]

    class Stream(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(stream)

        def __getitem__(self, index: int) -> Any:
            return stream[index]

    counted = {"tokens": 0, "batches": 0}

    def collator(examples: list[Any]) -> dict[str, Any]:
        batch = collate(examples, tokenizer.pad_token_id)
        counted["tokens"] += int(batch["attention_mask"].sum())
        counted["batches"] += 1
        return batch

    class Timer(TrainerCallback):
        begin = end = 0.0

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            Timer.begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            Timer.end = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(output_dir), full_determinism=True, use_cpu=True, seed=tcfg.seed, data_seed=tcfg.seed,
        per_device_train_batch_size=tcfg.batch_size,
        gradient_accumulation_steps=tcfg.gradient_accumulation_steps // world_size,
        **({"ddp_backend": "gloo"} if world_size > 1 else {}),
        max_steps=max_steps, learning_rate=tcfg.learning_rate, warmup_steps=warmup_steps,
        lr_scheduler_type=tcfg.lr_scheduler_type, optim="adamw_torch_fused", weight_decay=tcfg.weight_decay,
        adam_beta1=tcfg.adam_beta1, adam_beta2=tcfg.adam_beta2, adam_epsilon=tcfg.adam_epsilon,
        max_grad_norm=tcfg.max_grad_norm, eval_strategy="no", save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        dataloader_drop_last=True, remove_unused_columns=False, train_sampling_strategy="sequential",
    )
    trainer = Trainer(model=model, args=args, train_dataset=Stream(), data_collator=collator, callbacks=[Timer()])
    output = trainer.train()
    seconds = Timer.end - Timer.begin
    if adapter_dir is not None:
        model.save_pretrained(str(adapter_dir))
    return {"tokens_per_second": round(counted["tokens"] / seconds, 1), "train_seconds": round(seconds, 3),
            "tokens": counted["tokens"], "batches": counted["batches"], "steps": trainer.state.global_step,
            "train_loss": output.training_loss, "torch_threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
