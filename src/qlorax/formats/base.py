"""What every data format is: the interface the registry hands out, and the one spelling of a
JSON value's type in error messages (shared by the formats and the JSONL reader)."""

from __future__ import annotations

from typing import Any, Protocol

# One piece of an example: its text and whether it is completion (trained on) or prompt (masked).
Segment = tuple[str, bool]


class DataFormat(Protocol):
    """A JSONL row layout: how a row is checked, cut into prompt and completion, and how an
    evaluation prompt is asked of a model trained on it."""

    name: str
    # Whether training wraps each example in the tokenizer's BOS ... EOS (False where a chat
    # template writes its own special tokens).
    adds_bos_eos: bool
    # axolotl's dataset `type` for this layout (`qlorax config import`); None: axolotl has none.
    axolotl_type: str | None
    # The fields a row holds (what `data.columns` may map a file's columns to).
    fields: tuple[str, ...]

    def validate(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        """The fields training uses; a DataError naming `where` (file:line) and the key otherwise."""
        ...

    def segments(self, fields: dict[str, Any], tokenizer: Any, where: str) -> list[Segment]:
        """The example as (text, is_completion) pieces, tokenized separately so masks are exact."""
        ...

    def prompt_ids(self, tokenizer: Any, instruction: str, input_text: str) -> list[int]:
        """Token ids of an evaluation prompt, rendered as training renders its prompts."""
        ...


def wraps_in_bos_eos(fmt: DataFormat, fields: dict[str, Any]) -> bool:
    """Whether this row is wrapped in BOS ... EOS: the format's rule, or the row's own where the
    format renders some rows with a chat template (`row_adds_bos_eos`, e.g. prompt_completion)."""
    per_row = getattr(fmt, "row_adds_bos_eos", None)
    return bool(per_row(fields)) if per_row is not None else fmt.adds_bos_eos


def type_name(value: Any) -> str:
    """A JSON value's type in the words of the JSON spec (error messages name what was found)."""
    return {str: "string", int: "integer", float: "number", bool: "boolean", list: "list",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` alone: special tokens are placed by the caller, never by the tokenizer."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
