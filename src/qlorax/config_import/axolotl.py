"""axolotl: the converters of its keys whose values mean something else in qlorax (a total batch
size, a datasets list, a 4-bit switch, an adapter kind) and axolotl's defaults."""

from __future__ import annotations

from typing import Any

from qlorax.config_import.common import ALL_LINEAR, Converter, Untranslatable, local_jsonl
from qlorax.formats import FORMATS

DEFAULTS: dict[str, Any] = {"warmup_steps": 0}

# axolotl dataset `type` -> qlorax data.format, from the formats registry (alpaca rows, chat
# `messages`, raw `text`).
DATASET_TYPES = {fmt.axolotl_type: name for name, fmt in FORMATS.items() if fmt.axolotl_type}


def _fraction(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    if isinstance(value, int | float) and 0 <= value < 1:
        return {target: value}
    raise Untranslatable(f"{value!r} is an example count; qlorax takes a fraction below 1 in {target}")


def _all_linear(value: Any, source: dict[str, Any], target: str) -> dict[str, Any]:
    if not value:
        return {}
    return {target: sorted(set(ALL_LINEAR) | set(source.get("lora_target_modules") or []), key=_module_order)}


def _module_order(name: str) -> tuple[int, str]:
    return (ALL_LINEAR.index(name) if name in ALL_LINEAR else len(ALL_LINEAR), name)


def _four_bit(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    """axolotl's 4-bit load is always NF4 with double quantization."""
    if not value:
        return {}
    return {target: "nf4", "model.double_quant": True}


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


def _batch_size(value: Any, source: dict[str, Any], target: str) -> dict[str, Any]:
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


def _datasets(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        raise Untranslatable("qlorax trains on one dataset; give a list with one local JSONL entry")
    entry = value[0]
    kind = entry.get("type", "alpaca")
    if kind not in DATASET_TYPES:
        raise Untranslatable(f"dataset type {kind!r}: qlorax reads {', '.join(DATASET_TYPES)} "
                             f"(as data.format {', '.join(DATASET_TYPES.values())})")
    return {target: local_jsonl(entry.get("path")), "data.format": DATASET_TYPES[kind]}


CONVERTERS: dict[str, Converter] = {
    "fraction": _fraction, "all_linear": _all_linear, "axolotl_four_bit": _four_bit, "sdp_flag": _sdp_flag,
    "adapter": _adapter, "axolotl_batch_size": _batch_size, "axolotl_datasets": _datasets,
}
