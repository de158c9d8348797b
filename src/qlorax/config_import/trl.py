"""TRL (`trl sft --config FILE`): the converters of its model, PEFT and dataset keys beyond HF's,
and TRL's defaults where they differ from qlorax's."""

from __future__ import annotations

from typing import Any

from qlorax.config_import.common import Converter, Untranslatable, local_jsonl
from qlorax.config_import.hf import DEFAULTS as HF_DEFAULTS

DEFAULTS: dict[str, Any] = {**HF_DEFAULTS, "learning_rate": 2e-5, "lora_r": 16, "lora_alpha": 32, "max_length": 1024}


def _negate(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    return {} if value is None else {target: not value}


def _must_be_true(value: Any, _source: dict[str, Any], _target: str) -> dict[str, Any]:
    if value:
        return {}
    raise Untranslatable("false means full fine-tuning; qlorax trains LoRA adapters only")


def _four_bit(value: Any, source: dict[str, Any], target: str) -> dict[str, Any]:
    """TRL's load_in_4bit: bnb_4bit_quant_type (default nf4), nested quant off unless asked."""
    if not value:
        return {}
    return {target: source.get("bnb_4bit_quant_type") or "nf4"}


def _with_four_bit(value: Any, source: dict[str, Any], target: str) -> dict[str, Any]:
    if not source.get("load_in_4bit"):
        raise Untranslatable("it applies only with load_in_4bit: true")
    return {} if value is None else {target: value}


def _attention(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    if value in ("sdpa", "eager"):
        return {target: value}
    raise Untranslatable(f"attention {value!r}: qlorax runs 'sdpa' or 'eager' (on CPU)")


def _dataset_name(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    return {target: local_jsonl(value)}


CONVERTERS: dict[str, Converter] = {
    "negate": _negate, "must_be_true": _must_be_true, "four_bit": _four_bit, "with_four_bit": _with_four_bit,
    "attention": _attention, "dataset_name": _dataset_name,
}
