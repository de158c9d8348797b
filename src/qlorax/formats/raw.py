"""raw-text rows: {"text"}; every token is trained on (there is no prompt to mask)."""

from __future__ import annotations

from typing import Any

from qlorax.errors import DataError
from qlorax.formats.alpaca import alpaca_prompt_ids
from qlorax.formats.base import Segment, type_name


class Raw:
    """Continued pre-training on plain text."""

    name = "raw"
    adds_bos_eos = True
    fields = ("text",)
    axolotl_type: str | None = "completion"

    def validate(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        if "text" not in row:
            raise DataError(f"{where}: missing required field 'text' (raw format)")
        if not isinstance(row["text"], str):
            raise DataError(f"{where}: field 'text' must be a string, got {type_name(row['text'])}")
        if not row["text"].strip():
            raise DataError(f"{where}: field 'text' is empty")
        return {"text": row["text"]}

    def segments(self, fields: dict[str, Any], tokenizer: Any, where: str) -> list[Segment]:
        return [(fields["text"], True)]

    def prompt_ids(self, tokenizer: Any, instruction: str, input_text: str) -> list[int]:
        """Raw text has no prompt layout of its own; evaluation prompts use the alpaca template."""
        return alpaca_prompt_ids(tokenizer, instruction, input_text)


FORMAT = Raw()
