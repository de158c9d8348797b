"""What every tool's import shares: the "no equivalent" signal, the converter signature and the
converters more than one tool's table names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# What "all linear layers" means for the Llama-family models qlorax trains (lora_target_linear,
# TRL's "all-linear"): every projection, not the output head.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Untranslatable(Exception):
    """This value has no qlorax equivalent; the message says why."""


# (the foreign value, the whole foreign mapping, the rule's qlorax key) -> qlorax keys to set
Converter = Callable[[Any, dict[str, Any], str], dict[str, Any]]


def _same(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    return {target: value}


def _unset_if_none(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    return {} if value is None else {target: value}


def _must_be_false(value: Any, _source: dict[str, Any], _target: str) -> dict[str, Any]:
    """A switch for a mode qlorax does not have: off translates to nothing; on is unmapped (the
    rule's note says why)."""
    if not value:
        return {}
    raise Untranslatable("")


def _target_modules(value: Any, _source: dict[str, Any], target: str) -> dict[str, Any]:
    if value in ("all-linear", ["all-linear"]):
        return {target: ALL_LINEAR}
    return {target: [value] if isinstance(value, str) else value}


def local_jsonl(path: Any) -> str:
    """A dataset reference qlorax can read: one local JSONL (or JSON Lines) file."""
    if not isinstance(path, str) or not path.endswith((".jsonl", ".json")):
        raise Untranslatable(f"{path!r} is not a local JSONL file; qlorax reads one local JSONL file "
                             "(download the dataset and point data.path at it)")
    return path


CONVERTERS: dict[str, Converter] = {
    "same": _same, "unset_if_none": _unset_if_none, "must_be_false": _must_be_false,
    "target_modules": _target_modules,
}
