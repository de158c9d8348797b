"""alpaca rows: {"instruction", "input" (optional), "output"}; the prompt is the alpaca template,
the completion is the output."""

from __future__ import annotations

from typing import Any

from qlorax.errors import DataError
from qlorax.formats.base import Segment, encode, type_name

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def render_alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The alpaca prompt (everything before the response), chosen in one place so that
    training and generation can never disagree on it."""
    template = ALPACA_PROMPT_WITH_INPUT if input_text.strip() else ALPACA_PROMPT
    return template.format(instruction=instruction, input=input_text)


def alpaca_prompt_ids(tokenizer: Any, instruction: str, input_text: str) -> list[int]:
    """The alpaca prompt after BOS, as training feeds it (also how raw-text runs are asked)."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [*bos, *encode(tokenizer, render_alpaca_prompt(instruction, input_text))]


class Alpaca:
    """Instruction tuning on alpaca rows."""

    name = "alpaca"
    adds_bos_eos = True
    fields = ("instruction", "input", "output")
    axolotl_type: str | None = "alpaca"

    def validate(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        for key in ("instruction", "output"):
            if key not in row:
                raise DataError(f"{where}: missing required field '{key}' (alpaca format needs instruction, "
                                "output and optionally input)")
        for key in ("instruction", "input", "output"):
            if key in row and not isinstance(row[key], str):
                raise DataError(f"{where}: field '{key}' must be a string, got {type_name(row[key])}")
        if not row["output"].strip():
            raise DataError(f"{where}: field 'output' is empty")
        return {"instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"]}

    def segments(self, fields: dict[str, Any], tokenizer: Any, where: str) -> list[Segment]:
        return [(render_alpaca_prompt(fields["instruction"], fields["input"]), False), (fields["output"], True)]

    def prompt_ids(self, tokenizer: Any, instruction: str, input_text: str) -> list[int]:
        return alpaca_prompt_ids(tokenizer, instruction, input_text)


FORMAT = Alpaca()
