"""ShareGPT rows: {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}, rendered
with the base tokenizer's chat template as the chat format renders its messages (human → user,
gpt → assistant); the loss is on every gpt turn."""

from __future__ import annotations

from typing import Any

from qlorax.errors import DataError
from qlorax.formats.base import Segment, type_name
from qlorax.formats.chat import FORMAT as CHAT
from qlorax.formats.chat import template_segments

ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


class ShareGpt:
    """Multi-turn conversations in the ShareGPT layout."""

    name = "sharegpt"
    adds_bos_eos = False
    axolotl_type: str | None = None
    fields = ("conversations",)

    def validate(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        turns = row.get("conversations")
        if turns is None:
            raise DataError(f"{where}: missing required field 'conversations' (sharegpt format)")
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: field 'conversations' must be a non-empty list, got {type_name(turns)}")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
            if turn["from"] not in ROLES:
                raise DataError(f"{where}: conversations[{i}].from is {turn['from']!r}; expected one of "
                                f"{', '.join(ROLES)}")
            if not isinstance(turn["value"], str):
                raise DataError(f"{where}: conversations[{i}].value must be a string, got "
                                f"{type_name(turn['value'])}")
            messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: field 'conversations' has no 'gpt' turn (nothing to learn)")
        return {"messages": messages}

    def segments(self, fields: dict[str, Any], tokenizer: Any, where: str) -> list[Segment]:
        messages = fields["messages"]
        return template_segments(messages, tokenizer, where, [m["role"] == "assistant" for m in messages])

    def prompt_ids(self, tokenizer: Any, instruction: str, input_text: str) -> list[int]:
        """One human turn and the template's generation prompt, as the chat format asks."""
        return CHAT.prompt_ids(tokenizer, instruction, input_text)


FORMAT = ShareGpt()
