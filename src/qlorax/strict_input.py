"""Strict reading of what users write: YAML that refuses a key given twice, scalars that are
never coerced into something else (`true` is not 1), and every number finite. The config
and the gate thresholds are read through it, so a mistake is named instead of absorbed."""

from __future__ import annotations

import math
from typing import Any

import yaml

from qlorax.errors import ConfigError

TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def type_word(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else type(value).__name__


def scalar_type(annotation: Any) -> type | None:
    """bool, int, float or str when the field holds that scalar (optionally None), else None."""
    if annotation in TYPE_WORDS:
        return annotation
    options = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if len(options) == 1 and options[0] in TYPE_WORDS and type(None) in getattr(annotation, "__args__", ()):
        return options[0]
    return None


def strict_scalar(expected: type, value: Any) -> bool:
    """Whether `value` is a `expected` without a coercion that could hide a mistake: no bool
    for a number (`max_steps: true` is not 1), no number or string for a bool, no number for a
    string. An integral float (3.0) counts as an integer, and a numeric string as a number
    (PyYAML reads `1e-3` as a string; pydantic parses it, or names the key)."""
    if expected is bool:
        return isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if isinstance(value, str):
        return True
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return expected is float or isinstance(value, int) or value.is_integer()


def non_finite_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted keys (`lora.alpha`, `lora.target_modules[1]`) holding an infinite or NaN number."""
    if isinstance(data, float) and not math.isfinite(data):
        return [f"{prefix or '(top level)'} = {data}"]
    if isinstance(data, dict):
        return [found for key, value in data.items()
                for found in non_finite_keys(value, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(data, list):
        return [found for index, value in enumerate(data) for found in non_finite_keys(value, f"{prefix}[{index}]")]
    return []


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's SafeLoader, refusing a mapping that names a key twice (plain YAML keeps the last
    value silently, so `max_steps: 3` written twice would hide one of them)."""

    source = "config"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, tuple[int, int]] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            mark = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            try:
                first = seen.setdefault(key, mark)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                break
            if first != mark:
                here, there = ((f"line {mark[0]}", f"line {first[0]}") if first[0] != mark[0] else
                               (f"line {mark[0]}, column {mark[1]}", f"column {first[1]}"))
                raise ConfigError(f"{self.source}: duplicate key '{key}' at {here} (first set at {there}); "
                                  "a key may appear only once in a mapping")
        return super().construct_mapping(node, deep=deep)


def load_yaml_unique(text: str, source: str) -> Any:
    """Parse YAML safely, with duplicate keys an error naming the key and both lines."""
    loader = UniqueKeyLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
