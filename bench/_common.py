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


def matched_training_arguments(tcfg: Any, output_dir: Path, max_steps: int) -> Any:
    """HF TrainingArguments matching qlorax's loop for a training section: same optimizer,
    schedule, clipping and batches (consumed in order), no eval, saving or logging."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), full_determinism=True, use_cpu=True, seed=tcfg.seed, data_seed=tcfg.seed,
        per_device_train_batch_size=tcfg.batch_size, gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
        max_steps=max_steps, learning_rate=tcfg.learning_rate, warmup_steps=tcfg.warmup_steps,
        lr_scheduler_type="linear", optim="adamw_torch", weight_decay=tcfg.weight_decay,
        adam_beta1=tcfg.adam_beta1, adam_beta2=tcfg.adam_beta2, adam_epsilon=tcfg.adam_epsilon,
        max_grad_norm=tcfg.max_grad_norm, eval_strategy="no", save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        dataloader_drop_last=True, remove_unused_columns=False, train_sampling_strategy="sequential",
    )
