"""TRL's prompt/completion rows. Standard: {"prompt": str, "completion": str}, the two texts
one after the other between BOS and EOS, loss on the completion. Conversational: both values
are message lists ({"role", "content"}), rendered with the tokenizer's chat template, loss on
the completion's assistant turns only (as TRL's completion-only loss)."""

from __future__ import annotations

from typing import Any

from qlorax.errors import DataError
from qlorax.formats.alpaca import alpaca_prompt_ids
from qlorax.formats.base import Segment, type_name
from qlorax.formats.chat import FORMAT as CHAT
from qlorax.formats.chat import check_message_list, template_segments


class PromptCompletion:
    """Prompt → completion pairs, plain text or conversations."""

    name = "prompt_completion"
    adds_bos_eos = True
    axolotl_type: str | None = None
    fields = ("prompt", "completion")

    def validate(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        for key in self.fields:
            if key not in row:
                raise DataError(f"{where}: missing required field '{key}' (prompt_completion format needs "
                                "prompt and completion)")
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):
            for key in self.fields:
                check_message_list(row[key], where, key)
            if not any(m["role"] == "assistant" for m in completion):
                raise DataError(f"{where}: field 'completion' has no assistant message (nothing to learn)")
            strip = [{"role": m["role"], "content": m["content"]} for m in [*prompt, *completion]]
            return {"messages": strip, "prompt_turns": len(prompt)}
        for key in self.fields:
            if not isinstance(row[key], str):
                raise DataError(f"{where}: field '{key}' must be a string or a list of messages, got "
                                f"{type_name(row[key])}")
        if not completion.strip():
            raise DataError(f"{where}: field 'completion' is empty")
        return {"prompt": prompt, "completion": completion}

    def row_adds_bos_eos(self, fields: dict[str, Any]) -> bool:
        """Standard rows are wrapped in BOS ... EOS; a chat template writes its own tokens."""
        return "messages" not in fields

    def segments(self, fields: dict[str, Any], tokenizer: Any, where: str) -> list[Segment]:
        if "messages" not in fields:
            return [(fields["prompt"], False), (fields["completion"], True)]
        messages, first = fields["messages"], fields["prompt_turns"]
        return template_segments(messages, tokenizer, where, [i >= first for i in range(len(messages))])

    def prompt_ids(self, tokenizer: Any, instruction: str, input_text: str) -> list[int]:
        """The chat template's user turn when the tokenizer has one, else the alpaca prompt (the
        format says nothing of how a plain prompt is laid out)."""
        if getattr(tokenizer, "chat_template", None):
            return CHAT.prompt_ids(tokenizer, instruction, input_text)
        return alpaca_prompt_ids(tokenizer, instruction, input_text)


FORMAT = PromptCompletion()
