"""Other tools' names for qlorax's config keys: one table per tool (axolotl, TRL, HF
TrainingArguments) maps each of its keys to a qlorax key (`section.key`), or to None with the
reason there is no equivalent.

The same tables drive the unknown-key hint in qlorax.config ("`per_device_train_batch_size` is
the HF name; in qlorax it is `training.batch_size`"), the tool-name columns of the config
reference and `qlorax config import` (qlorax.config_import, which owns the value converters a
rule names in `convert`), so the three cannot disagree. Low in the layers on purpose: the
config imports it, so it imports nothing of qlorax's above the foundation.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from qlorax.optim import describe_optimizers

TOOLS = {"axolotl": "axolotl", "trl": "TRL", "hf": "HF"}


@dataclass(frozen=True)
class Rule:
    """A foreign key: its qlorax key (None: no equivalent), a note (the difference in meaning,
    or why there is no equivalent) and the name of the converter (qlorax.config_import) that
    turns its value into qlorax keys."""

    target: str | None
    note: str = ""
    convert: str = "same"


# --------------------------------------------------------------------------- the tables

_OUTPUT_DIR = "the output directory is `qlorax train --output-dir`, outside the config (it must not change the hash)"
_PRECISION = "LoRA weights train in float32; a 4-bit base computes in model.compute_dtype"
_LOGGING = "qlorax records every optimizer step in trace.jsonl and train.log"
_TRACKERS = "qlorax has no experiment trackers; every run writes trace.jsonl and results.json"
_DISTRIBUTED = "qlorax trains in one pinned CPU process; scale out with `qlorax verify --executor ray`"
_RESUME = "resume with `qlorax resume RUN_DIR`"
_LOADER = "qlorax's batches are a pure function of training.seed and the step; there is no data loader"
_HUB = "qlorax does not upload; the run directory is the artifact"
_MODEL_CLASS = "qlorax loads every model through AutoModelForCausalLM/AutoTokenizer from model.name_or_path"
_BEST = "qlorax keeps the final adapter; eval history is in results.json"
_COMPILE = "qlorax runs eager PyTorch (compiled kernels would change the bits)"
_OPTIMIZER = f"qlorax always uses {describe_optimizers()}"

_TRAINING_ARGUMENTS: dict[str, Rule] = {
    "per_device_train_batch_size": Rule("training.batch_size", "micro-batch"),
    "per_device_eval_batch_size": Rule("training.eval_batch_size"),
    "gradient_accumulation_steps": Rule("training.gradient_accumulation_steps"),
    "learning_rate": Rule("training.learning_rate"),
    "weight_decay": Rule("training.weight_decay"),
    "adam_beta1": Rule("training.adam_beta1"),
    "adam_beta2": Rule("training.adam_beta2"),
    "adam_epsilon": Rule("training.adam_epsilon"),
    "max_grad_norm": Rule("training.max_grad_norm"),
    "num_train_epochs": Rule("training.num_epochs", "passes over the training split", "epochs"),
    "max_steps": Rule("training.max_steps", "", "positive_steps"),
    "lr_scheduler_type": Rule("training.lr_scheduler_type", "", "scheduler"),
    "warmup_ratio": Rule("training.warmup_ratio", "", "warmup_ratio"),
    "warmup_steps": Rule("training.warmup_steps"),
    "save_steps": Rule("training.save_steps", "", "positive_steps"),
    "save_total_limit": Rule("training.save_total_limit", "", "unset_if_none"),
    "eval_steps": Rule("training.eval_steps", "", "positive_steps"),
    "seed": Rule("training.seed"),
    "gradient_checkpointing": Rule("model.gradient_checkpointing"),
    "optim": Rule(None, _OPTIMIZER, "optimizer"),
    "output_dir": Rule(None, _OUTPUT_DIR),
    "overwrite_output_dir": Rule(None, "`qlorax train --force` replaces an existing run directory"),
    "do_train": Rule(None, "qlorax always trains"),
    "do_eval": Rule(None, "qlorax always evaluates on the data.eval_fraction split"),
    "do_predict": Rule(None, "qlorax writes greedy samples of bundled prompts to samples.jsonl"),
    "eval_strategy": Rule(None, "qlorax evaluates every training.eval_steps steps and at the end"),
    "evaluation_strategy": Rule(None, "qlorax evaluates every training.eval_steps steps and at the end"),
    "save_strategy": Rule(None, "qlorax checkpoints every training.save_steps steps"),
    "logging_steps": Rule(None, _LOGGING), "logging_strategy": Rule(None, _LOGGING),
    "logging_dir": Rule(None, _LOGGING), "logging_first_step": Rule(None, _LOGGING),
    "data_seed": Rule(None, "qlorax derives the data order from training.seed"),
    "bf16": Rule(None, _PRECISION), "fp16": Rule(None, _PRECISION), "tf32": Rule(None, _PRECISION),
    "report_to": Rule(None, _TRACKERS), "run_name": Rule(None, _TRACKERS),
    "full_determinism": Rule(None, "qlorax is always deterministic (determinism.profile, strict by default)"),
    "use_cpu": Rule(None, "qlorax trains on CPU"), "no_cuda": Rule(None, "qlorax trains on CPU"),
    "resume_from_checkpoint": Rule(None, _RESUME),
    "push_to_hub": Rule(None, _HUB), "hub_model_id": Rule(None, _HUB), "hub_strategy": Rule(None, _HUB),
    "load_best_model_at_end": Rule(None, _BEST), "metric_for_best_model": Rule(None, _BEST),
    "torch_compile": Rule(None, _COMPILE),
    "local_rank": Rule(None, _DISTRIBUTED), "deepspeed": Rule(None, _DISTRIBUTED), "fsdp": Rule(None, _DISTRIBUTED),
    "group_by_length": Rule(None, "qlorax shuffles per epoch from training.seed; no length grouping"),
    "remove_unused_columns": Rule(None, "qlorax reads only the fields its data.format needs"),
    "dataloader_num_workers": Rule(None, _LOADER), "dataloader_drop_last": Rule(None, _LOADER),
    "dataloader_pin_memory": Rule(None, _LOADER),
    "label_smoothing_factor": Rule(None, "qlorax's loss is plain token-weighted cross-entropy"),
    "disable_tqdm": Rule(None, "qlorax prints one progress line per step"),
    "average_tokens_across_devices": Rule(None, "qlorax divides by the target tokens of the whole "
                                                "accumulation window, on one device"),
}

# `trl sft --config FILE`: SFTConfig (a TrainingArguments) plus TRL's ModelConfig and ScriptArguments.
_TRL: dict[str, Rule] = {
    **_TRAINING_ARGUMENTS,
    "model_name_or_path": Rule("model.name_or_path"),
    "model_revision": Rule("model.revision", "", "unset_if_none"),
    "attn_implementation": Rule("model.attn_implementation", "", "attention"),
    "torch_dtype": Rule(None, _PRECISION), "dtype": Rule(None, _PRECISION),
    "trust_remote_code": Rule(None, "qlorax never runs code shipped with a model"),
    "use_peft": Rule(None, "qlorax always trains a LoRA adapter", "must_be_true"),
    "lora_r": Rule("lora.r"), "lora_alpha": Rule("lora.alpha"), "lora_dropout": Rule("lora.dropout"),
    "lora_target_modules": Rule("lora.target_modules", "", "target_modules"),
    "lora_modules_to_save": Rule("lora.modules_to_save", "", "unset_if_none"),
    "lora_task_type": Rule(None, "qlorax trains causal-LM adapters (CAUSAL_LM)"),
    "use_dora": Rule("lora.use_dora"), "use_rslora": Rule("lora.use_rslora"),
    "load_in_4bit": Rule("model.quantization", "bitsandbytes 4-bit base", "four_bit"),
    "bnb_4bit_quant_type": Rule("model.quantization", "", "with_four_bit"),
    "use_bnb_nested_quant": Rule("model.double_quant", "", "with_four_bit"),
    "load_in_8bit": Rule(None, "qlorax quantizes bases to 4 bits only (nf4/fp4)", "must_be_false"),
    "max_seq_length": Rule("data.max_length", "tokens per example", "unset_if_none"),
    "max_length": Rule("data.max_length", "tokens per example", "unset_if_none"),
    "packing": Rule("training.packing", "qlorax joins each micro-batch's examples into one padding-free row; "
                                        "TRL fills rows of max_length from several examples"),
    "dataset_name": Rule("data.path", "", "dataset_name"),
    "dataset_text_field": Rule(None, "raw-text data is JSONL with a 'text' field (data.format: raw)"),
    "completion_only_loss": Rule("data.train_on_inputs", "inverted: true means train_on_inputs false", "negate"),
    "assistant_only_loss": Rule("data.train_on_inputs", "inverted: true means train_on_inputs false", "negate"),
    "dataset_num_proc": Rule(None, "qlorax tokenizes in the training process"),
    "eos_token": Rule(None, "qlorax uses the tokenizer's own special tokens"),
    "pad_token": Rule(None, "qlorax uses the tokenizer's own special tokens"),
}

_AXOLOTL: dict[str, Rule] = {
    "base_model": Rule("model.name_or_path"),
    "revision_of_model": Rule("model.revision"),
    "base_model_config": Rule(None, _MODEL_CLASS), "model_type": Rule(None, _MODEL_CLASS),
    "tokenizer_type": Rule(None, _MODEL_CLASS), "tokenizer_config": Rule(None, _MODEL_CLASS),
    "is_llama_derived_model": Rule(None, _MODEL_CLASS),
    "trust_remote_code": Rule(None, "qlorax never runs code shipped with a model"),
    "load_in_8bit": Rule(None, "qlorax quantizes bases to 4 bits only (nf4/fp4)", "must_be_false"),
    "load_in_4bit": Rule("model.quantization", "axolotl's 4-bit load: NF4 with double quantization",
                         "axolotl_four_bit"),
    "adapter": Rule(None, "qlorax always trains a LoRA adapter; for qlora set model.quantization: nf4", "adapter"),
    "lora_model_dir": Rule(None, "qlorax starts every adapter from its seeded init"),
    "lora_r": Rule("lora.r"), "lora_alpha": Rule("lora.alpha"), "lora_dropout": Rule("lora.dropout"),
    "lora_target_modules": Rule("lora.target_modules", "", "target_modules"),
    "lora_target_linear": Rule("lora.target_modules", "every linear projection (not lm_head)", "all_linear"),
    "lora_modules_to_save": Rule("lora.modules_to_save", "", "unset_if_none"),
    "lora_fan_in_fan_out": Rule(None, "Llama-family linear layers need no fan-in/fan-out swap", "must_be_false"),
    "peft_use_dora": Rule("lora.use_dora"), "peft_use_rslora": Rule("lora.use_rslora"),
    "sequence_len": Rule("data.max_length", "tokens per example"),
    "sample_packing": Rule("training.packing", "qlorax joins each micro-batch's examples into one padding-free "
                                               "row; axolotl's multipack fills sequence_len with examples that fit"),
    "eval_sample_packing": Rule(None, "qlorax evaluates padded batches", "must_be_false"),
    "pad_to_sequence_len": Rule(None, "qlorax pads each micro-batch to its longest example (or packs it: "
                                      "training.packing)"),
    "datasets": Rule("data.path", "one local JSONL file; its type becomes data.format", "axolotl_datasets"),
    "dataset_prepared_path": Rule(None, "qlorax tokenizes in the training process; nothing is cached"),
    "val_set_size": Rule("data.eval_fraction", "", "fraction"),
    "output_dir": Rule(None, _OUTPUT_DIR),
    "micro_batch_size": Rule("training.batch_size", "micro-batch"),
    "gradient_accumulation_steps": Rule("training.gradient_accumulation_steps"),
    "batch_size": Rule("training.gradient_accumulation_steps", "axolotl's batch_size is the total per step; "
                       "qlorax's training.batch_size is the micro-batch", "axolotl_batch_size"),
    "eval_batch_size": Rule("training.eval_batch_size"),
    "num_epochs": Rule("training.num_epochs", "passes over the training split", "epochs"),
    "max_steps": Rule("training.max_steps", "", "positive_steps"),
    "optimizer": Rule(None, _OPTIMIZER, "optimizer"),
    "lr_scheduler": Rule("training.lr_scheduler_type", "", "scheduler"),
    "learning_rate": Rule("training.learning_rate"),
    "warmup_steps": Rule("training.warmup_steps"),
    "warmup_ratio": Rule("training.warmup_ratio", "", "warmup_ratio"),
    "weight_decay": Rule("training.weight_decay"),
    "max_grad_norm": Rule("training.max_grad_norm"),
    "adam_beta1": Rule("training.adam_beta1"), "adam_beta2": Rule("training.adam_beta2"),
    "adam_epsilon": Rule("training.adam_epsilon"),
    "seed": Rule("training.seed"),
    "eval_steps": Rule("training.eval_steps", "", "positive_steps"),
    "save_steps": Rule("training.save_steps", "", "positive_steps"),
    "save_total_limit": Rule("training.save_total_limit"),
    "evals_per_epoch": Rule(None, "qlorax counts in steps: set training.eval_steps"),
    "saves_per_epoch": Rule(None, "qlorax counts in steps: set training.save_steps"),
    "logging_steps": Rule(None, _LOGGING),
    "train_on_inputs": Rule("data.train_on_inputs"),
    "group_by_length": Rule(None, "qlorax shuffles per epoch from training.seed; no length grouping"),
    "gradient_checkpointing": Rule("model.gradient_checkpointing"),
    "sdp_attention": Rule("model.attn_implementation", "", "sdp_flag"),
    "flash_attention": Rule(None, "qlorax runs sdpa or eager attention (on CPU)", "must_be_false"),
    "xformers_attention": Rule(None, "qlorax runs sdpa or eager attention (on CPU)", "must_be_false"),
    "bf16": Rule(None, _PRECISION), "fp16": Rule(None, _PRECISION), "tf32": Rule(None, _PRECISION),
    "special_tokens": Rule(None, "qlorax uses the tokenizer's own special tokens and adds none"),
    "tokens": Rule(None, "qlorax adds no tokens to the tokenizer"),
    "chat_template": Rule(None, "data.format chat uses the tokenizer's own chat template"),
    "early_stopping_patience": Rule(None, "qlorax trains the configured steps; no early stopping"),
    "resume_from_checkpoint": Rule(None, _RESUME), "auto_resume_from_checkpoints": Rule(None, _RESUME),
    "local_rank": Rule(None, _DISTRIBUTED), "deepspeed": Rule(None, _DISTRIBUTED),
    "fsdp": Rule(None, _DISTRIBUTED), "fsdp_config": Rule(None, _DISTRIBUTED),
    "wandb_*": Rule(None, _TRACKERS), "mlflow_*": Rule(None, _TRACKERS),
    "hub_model_id": Rule(None, _HUB), "hub_strategy": Rule(None, _HUB),
    "strict": Rule(None, "qlorax is always strict: unknown keys are errors"),
    "debug": Rule(None, "qlorax writes train.log for every run"),
    "torch_compile": Rule(None, _COMPILE),
}

TABLES: dict[str, dict[str, Rule]] = {"axolotl": _AXOLOTL, "trl": _TRL, "hf": _TRAINING_ARGUMENTS}


def rule_for(tool: str, key: str) -> Rule | None:
    """The tool's rule for `key`: an exact entry, else a wildcard one (`wandb_*`)."""
    table = TABLES[tool]
    if key in table:
        return table[key]
    return next((rule for pattern, rule in table.items() if "*" in pattern and fnmatch.fnmatch(key, pattern)), None)


def foreign_names(target: str) -> dict[str, list[str]]:
    """Each tool's names for the qlorax key `target` (for the config reference)."""
    return {TOOLS[tool]: [key for key, rule in table.items() if rule.target == target]
            for tool, table in TABLES.items()}


def foreign_key_hint(key: str) -> str | None:
    """For an unknown qlorax key that is another tool's name: what it is called in qlorax, or
    why qlorax has none. None when no tool knows the key."""
    known = {tool: rule for tool in ("hf", "trl", "axolotl") if (rule := rule_for(tool, key)) is not None}
    if not known:
        return None
    first = next(iter(known.values()))
    tools = " and ".join(TOOLS[tool] for tool, rule in known.items() if rule.target == first.target)
    if first.target is None:
        return f"'{key}' is the {tools} name; qlorax has no equivalent: {first.note}"
    note = f" ({first.note})" if first.note else ""
    return f"'{key}' is the {tools} name; in qlorax it is '{first.target}'{note}"
