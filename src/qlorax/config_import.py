"""Translate an axolotl, TRL or Hugging Face TrainingArguments config into a qlorax config.

One table per tool maps each of its keys to a qlorax key (`section.key`) or to None with the
reason there is no equivalent. The same tables drive the unknown-key hint in qlorax.config
("`per_device_train_batch_size` is the HF name; in qlorax it is `training.batch_size`") and
the tool-name column of the config reference, so the three cannot disagree. Value changes
(HF's max_steps=-1, axolotl's lora_target_linear, a datasets list) are small named converters
referenced from the tables. No torch here: `qlorax config import` must stay light.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlorax.errors import ConfigError

TOOLS = {"axolotl": "axolotl", "trl": "TRL", "hf": "HF"}

# What "all linear layers" means for the Llama-family models qlorax trains (lora_target_linear,
# TRL's "all-linear"): every projection, not the output head.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAMW_FAMILY = {"adamw_torch", "adamw_hf", "adamw_torch_fused", "adamw", "adamw_8bit", "adamw_bnb_8bit",
                "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch_4bit"}
SCHEDULERS = {"linear", "cosine", "constant", "constant_with_warmup"}


class Untranslatable(Exception):
    """This value has no qlorax equivalent; the message says why."""


Converter = Callable[[Any, dict[str, Any], str], dict[str, Any]]


@dataclass(frozen=True)
class Rule:
    """A foreign key: its qlorax key (None: no equivalent), a note (the difference in meaning,
    or why there is no equivalent) and the converter that turns its value into qlorax keys."""

    target: str | None
    note: str = ""
    convert: str = "same"


@dataclass
class ImportReport:
    """What `import_config` did: the qlorax config (nested mapping) and a line per foreign key."""

    tool: str
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    translated: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- converters


def _same(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    return {target: value}


def _unset_if_none(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    return {} if value is None else {target: value}


def _positive_steps(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    """HF/axolotl use -1, 0 or null for "not set"; a float below 1 is HF's fraction of training."""
    if value is None or (isinstance(value, int | float) and value <= 0):
        return {}
    if isinstance(value, float) and value < 1:
        raise Untranslatable(f"{value} is a fraction of the training steps; qlorax counts {target} in steps")
    return {target: int(value) if isinstance(value, float) and value.is_integer() else value}


def _epochs(value: Any, source: dict[str, Any], target: str) -> dict[str, Any]:
    if isinstance(source.get("max_steps"), int | float) and source["max_steps"] > 0:
        raise Untranslatable("max_steps > 0 is also set and overrides it (in HF and axolotl too)")
    return {target: value}


def _warmup_ratio(value: Any, source: dict[str, Any], target: str) -> dict[str, Any]:
    if not value:
        return {}
    if source.get("warmup_steps"):
        raise Untranslatable("warmup_steps > 0 is also set and overrides it (in HF too)")
    return {target: value}


def _negate(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    return {} if value is None else {target: not value}


def _fraction(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    if isinstance(value, int | float) and 0 <= value < 1:
        return {target: value}
    raise Untranslatable(f"{value!r} is an example count; qlorax takes a fraction below 1 in {target}")


def _scheduler(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    if value in SCHEDULERS:
        return {target: value}
    raise Untranslatable(f"schedule {value!r} is not one of qlorax's {', '.join(sorted(SCHEDULERS))}")


def _adamw(value: Any, _source: dict[str, Any], _target: str) -> dict[str, Any]:
    if str(value).lower() in ADAMW_FAMILY:
        return {}
    raise Untranslatable(f"optimizer {value!r} is not AdamW; qlorax trains with torch.optim.AdamW only")


def _must_be_false(value: Any, _source: dict[str, Any], _target: str) -> dict[str, Any]:
    """A switch for a mode qlorax does not have: off translates to nothing; on is unmapped (the
    rule's note says why)."""
    if not value:
        return {}
    raise Untranslatable("")


def _must_be_true(value: Any, _source: dict[str, Any], _target: str) -> dict[str, Any]:
    if value:
        return {}
    raise Untranslatable("false means full fine-tuning; qlorax trains LoRA adapters only")


def _target_modules(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    if value in ("all-linear", ["all-linear"]):
        return {target: ALL_LINEAR}
    return {target: [value] if isinstance(value, str) else value}


def _all_linear(value: Any, source: dict[str, Any], target: str) -> dict[str, Any]:
    if not value:
        return {}
    return {target: sorted(set(ALL_LINEAR) | set(source.get("lora_target_modules") or []), key=_module_order)}


def _module_order(name: str) -> tuple[int, str]:
    return (ALL_LINEAR.index(name) if name in ALL_LINEAR else len(ALL_LINEAR), name)


def _four_bit(value: Any, source: dict[str, Any], target: str) -> dict[str, Any]:
    """TRL's load_in_4bit: bnb_4bit_quant_type (default nf4), nested quant off unless asked."""
    if not value:
        return {}
    return {target: source.get("bnb_4bit_quant_type") or "nf4"}


def _axolotl_four_bit(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    """axolotl's 4-bit load is always NF4 with double quantization."""
    if not value:
        return {}
    return {target: "nf4", "model.double_quant": True}


def _with_four_bit(value: Any, source: dict[str, Any], target: str) -> dict[str, Any]:
    if not source.get("load_in_4bit"):
        raise Untranslatable("it applies only with load_in_4bit: true")
    return {} if value is None else {target: value}


def _attention(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    if value in ("sdpa", "eager"):
        return {target: value}
    raise Untranslatable(f"attention {value!r}: qlorax runs 'sdpa' or 'eager' (on CPU)")


def _sdp_flag(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    return {target: "sdpa"} if value else {}


def _adapter(value: Any, source: dict[str, Any], _target: str) -> dict[str, Any]:
    if value == "lora":
        return {}
    if value == "qlora":
        if source.get("load_in_4bit"):
            return {}
        raise Untranslatable("qlora needs load_in_4bit: true (which becomes model.quantization: nf4)")
    raise Untranslatable(f"adapter {value!r}: qlorax trains LoRA adapters only")


def _axolotl_batch_size(value: Any, source: dict[str, Any], target: str) -> dict[str, Any]:
    """axolotl's batch_size is the total per step: micro_batch_size x gradient_accumulation_steps."""
    micro = source.get("micro_batch_size")
    if not isinstance(micro, int) or micro < 1 or not isinstance(value, int) or value % micro:
        raise Untranslatable("axolotl's batch_size is the total per optimizer step; qlorax's training.batch_size "
                             "is the micro-batch: set micro_batch_size and gradient_accumulation_steps")
    accumulation = value // micro
    given = source.get("gradient_accumulation_steps")
    if given is not None and given != accumulation:
        raise Untranslatable(f"it says {value} per step but micro_batch_size x gradient_accumulation_steps is "
                             f"{micro * given}; the latter is used")
    return {target: accumulation}


def _local_jsonl(path: Any) -> str:
    if not isinstance(path, str) or not path.endswith((".jsonl", ".json")):
        raise Untranslatable(f"{path!r} is not a local JSONL file; qlorax reads one local JSONL file "
                             "(download the dataset and point data.path at it)")
    return path


# axolotl dataset `type` -> qlorax data.format (alpaca rows, chat `messages`, raw `text`).
AXOLOTL_DATASET_TYPES = {"alpaca": "alpaca", "chat_template": "chat", "completion": "raw"}


def _axolotl_datasets(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        raise Untranslatable("qlorax trains on one dataset; give a list with one local JSONL entry")
    entry = value[0]
    kind = entry.get("type", "alpaca")
    if kind not in AXOLOTL_DATASET_TYPES:
        raise Untranslatable(f"dataset type {kind!r}: qlorax reads {', '.join(AXOLOTL_DATASET_TYPES)} "
                             "(as data.format alpaca, chat, raw)")
    return {target: _local_jsonl(entry.get("path")), "data.format": AXOLOTL_DATASET_TYPES[kind]}


def _dataset_name(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    return {target: _local_jsonl(value)}


CONVERTERS: dict[str, Converter] = {
    "same": _same, "unset_if_none": _unset_if_none, "positive_steps": _positive_steps, "epochs": _epochs,
    "warmup_ratio": _warmup_ratio, "negate": _negate, "fraction": _fraction, "scheduler": _scheduler,
    "adamw": _adamw, "must_be_false": _must_be_false, "must_be_true": _must_be_true,
    "target_modules": _target_modules, "all_linear": _all_linear, "four_bit": _four_bit,
    "axolotl_four_bit": _axolotl_four_bit, "with_four_bit": _with_four_bit, "attention": _attention,
    "sdp_flag": _sdp_flag, "adapter": _adapter, "axolotl_batch_size": _axolotl_batch_size,
    "axolotl_datasets": _axolotl_datasets, "dataset_name": _dataset_name,
}

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
    "optim": Rule(None, "qlorax always uses torch.optim.AdamW(foreach=False)", "adamw"),
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
    "packing": Rule(None, "qlorax pads each micro-batch to its longest example; no packing", "must_be_false"),
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
    "sample_packing": Rule(None, "qlorax pads each micro-batch to its longest example; no packing",
                           "must_be_false"),
    "eval_sample_packing": Rule(None, "qlorax does not pack", "must_be_false"),
    "pad_to_sequence_len": Rule(None, "qlorax pads each micro-batch to its longest example"),
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
    "optimizer": Rule(None, "qlorax always uses torch.optim.AdamW(foreach=False)", "adamw"),
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

# The tool's own defaults where they differ from qlorax's, applied to keys the file leaves out
# (an HF run without warmup_steps has none; qlorax's default would warm up for 4 steps).
_HF_DEFAULTS = {"learning_rate": 5e-5, "warmup_steps": 0, "num_train_epochs": 3.0}
DEFAULTS: dict[str, dict[str, Any]] = {
    "hf": _HF_DEFAULTS,
    "trl": {**_HF_DEFAULTS, "learning_rate": 2e-5, "lora_r": 16, "lora_alpha": 32, "max_length": 1024},
    "axolotl": {"warmup_steps": 0},
}
# A default that does not apply when the file sets any of these keys.
_DEFAULT_UNLESS = {"warmup_steps": ("warmup_ratio",), "num_train_epochs": ("max_steps",),
                   "max_length": ("max_seq_length",)}


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


# --------------------------------------------------------------------------- the import


def read_foreign_config(path: Path) -> dict[str, Any]:
    """A YAML or JSON file whose top level is a flat mapping of the tool's keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _is_set(value: Any) -> bool:
    """HF and axolotl write "not set" as null, 0 or -1."""
    return value is not None and value is not False and not (isinstance(value, int | float) and value <= 0)


def import_config(tool: str, source: dict[str, Any]) -> ImportReport:
    """Translate a flat mapping of `tool`'s keys; every key ends up in `translated` or `unmapped`."""
    if tool not in TABLES:
        raise ConfigError(f"--from {tool!r}: expected one of {', '.join(TABLES)}")
    report = ImportReport(tool=tool)
    defaults = {key: value for key, value in DEFAULTS[tool].items()
                if key not in source and not any(_is_set(source.get(other)) for other in _DEFAULT_UNLESS.get(key, ()))}
    for key, value in defaults.items():
        report.translated.append(f"{key}: not in the file; {TOOLS[tool]}'s default {value!r} applies")
    source = {**defaults, **source}
    for key, value in source.items():
        rule = rule_for(tool, str(key))
        if rule is None:
            report.unmapped.append(f"{key}: not a {TOOLS[tool]} key qlorax knows; left out")
            continue
        if value is None and rule.target is not None:
            report.translated.append(f"{key}: null -> not set (qlorax's default applies)")
            continue
        if rule.target is None and rule.convert == "same":
            report.unmapped.append(f"{key}: {rule.note}")
            continue
        try:
            values = CONVERTERS[rule.convert](value, source, rule.target or "")
        except Untranslatable as exc:
            report.unmapped.append(f"{key}: {value!r}: {str(exc) or rule.note}")
            continue
        note = f"  ({rule.note})" if rule.note else ""
        if not values:
            report.translated.append(f"{key}: {value!r} -> nothing to set{note}")
        for target, converted in values.items():
            section, name = target.split(".", 1)
            report.config.setdefault(section, {})[name] = converted
            report.translated.append(f"{key}: {value!r} -> {target}: {converted!r}{note}")
    report.config = _in_schema_order(report.config)
    return report


def _in_schema_order(config: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Sections and keys in the order of qlorax's own config (and `config show`)."""
    from qlorax.config import QloraxConfig

    ordered: dict[str, dict[str, Any]] = {}
    for name, section in QloraxConfig.model_fields.items():
        if name in config:
            keys = list(section.annotation.model_fields)  # type: ignore[union-attr]
            ordered[name] = dict(sorted(config[name].items(), key=lambda item: keys.index(item[0])))
    return ordered
