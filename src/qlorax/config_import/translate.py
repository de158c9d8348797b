"""The import itself: read the foreign file, apply each key's rule (qlorax.config_hints) through
its converter (one module per tool), fill in the tool's own defaults, and order the result
like qlorax's config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlorax.config import QloraxConfig
from qlorax.config_hints import TABLES, TOOLS, rule_for
from qlorax.config_import.axolotl import CONVERTERS as AXOLOTL_CONVERTERS
from qlorax.config_import.axolotl import DEFAULTS as AXOLOTL_DEFAULTS
from qlorax.config_import.common import CONVERTERS as COMMON_CONVERTERS
from qlorax.config_import.common import Converter, Untranslatable
from qlorax.config_import.hf import CONVERTERS as HF_CONVERTERS
from qlorax.config_import.hf import DEFAULTS as HF_DEFAULTS
from qlorax.config_import.trl import CONVERTERS as TRL_CONVERTERS
from qlorax.config_import.trl import DEFAULTS as TRL_DEFAULTS
from qlorax.errors import ConfigError

CONVERTERS: dict[str, Converter] = {**COMMON_CONVERTERS, **HF_CONVERTERS, **TRL_CONVERTERS, **AXOLOTL_CONVERTERS}
# The tool's own defaults where they differ from qlorax's, applied to keys the file leaves out.
DEFAULTS: dict[str, dict[str, Any]] = {"hf": HF_DEFAULTS, "trl": TRL_DEFAULTS, "axolotl": AXOLOTL_DEFAULTS}
# A default that does not apply when the file sets any of these keys.
_DEFAULT_UNLESS = {"warmup_steps": ("warmup_ratio",), "num_train_epochs": ("max_steps",),
                   "max_length": ("max_seq_length",)}


@dataclass
class ImportReport:
    """What `import_config` did: the qlorax config (nested mapping) and a line per foreign key."""

    tool: str
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    translated: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)


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
        _translate_key(report, str(key), value, source)
    report.config = _in_schema_order(report.config)
    return report


def _translate_key(report: ImportReport, key: str, value: Any, source: dict[str, Any]) -> None:
    """One foreign key into the report: its qlorax keys and a `translated` line, or an `unmapped` line."""
    rule = rule_for(report.tool, key)
    if rule is None:
        report.unmapped.append(f"{key}: not a {TOOLS[report.tool]} key qlorax knows; left out")
        return
    if value is None and rule.target is not None:
        report.translated.append(f"{key}: null -> not set (qlorax's default applies)")
        return
    if rule.target is None and rule.convert == "same":
        report.unmapped.append(f"{key}: {rule.note}")
        return
    try:
        values = CONVERTERS[rule.convert](value, source, rule.target or "")
    except Untranslatable as exc:
        report.unmapped.append(f"{key}: {value!r}: {str(exc) or rule.note}")
        return
    note = f"  ({rule.note})" if rule.note else ""
    if not values:
        report.translated.append(f"{key}: {value!r} -> nothing to set{note}")
    for target, converted in values.items():
        section, name = target.split(".", 1)
        report.config.setdefault(section, {})[name] = converted
        report.translated.append(f"{key}: {value!r} -> {target}: {converted!r}{note}")


def _in_schema_order(config: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Sections and keys in the order of qlorax's own config (and `config show`)."""
    ordered: dict[str, dict[str, Any]] = {}
    for name, section in QloraxConfig.model_fields.items():
        if name in config:
            keys = list(section.annotation.model_fields)  # type: ignore[union-attr]
            ordered[name] = dict(sorted(config[name].items(), key=lambda item: keys.index(item[0])))
    return ordered
