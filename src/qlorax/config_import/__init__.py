"""Translate an axolotl, TRL or Hugging Face TrainingArguments config into a qlorax config.

Which foreign key becomes which qlorax key is qlorax.config_hints' tables (shared with the
unknown-key hint and the config reference); how a value converts is a small named converter,
in the module of the tool that needs it (hf, trl, axolotl; common for the shared ones), and
`translate` runs the import. No torch here: `qlorax config import` must stay light.
"""

from __future__ import annotations

from qlorax.config_hints import TOOLS
from qlorax.config_import.translate import ImportReport, import_config, read_foreign_config

__all__ = ["TOOLS", "ImportReport", "import_config", "read_foreign_config"]
