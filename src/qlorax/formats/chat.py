"""chat rows: {"messages": [{"role", "content"}, ...]} rendered with the base tokenizer's own chat
template; the assistant turns are the completion. The template writes its own special tokens."""

from __future__ import annotations

from typing import Any

from qlorax.errors import DataError
from qlorax.formats.base import Segment, encode, type_name

CHAT_ROLES = ("system", "user", "assistant")


def chat_user_message(instruction: str, input_text: str = "") -> str:
    """An alpaca instruction (and input) as one user turn: how the bundled chat dataset
    (reproducible_ml_chat.jsonl) was made from the alpaca one, and how evaluation prompts
    are asked in chat-format runs."""
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def check_message_list(messages: Any, where: str, key: str) -> None:
    """`key` holds a non-empty list of {role, content} messages (roles system, user, assistant)."""
    if messages is None:
        raise DataError(f"{where}: missing required field '{key}'")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{key}' must be a non-empty list, got {type_name(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: {key}[{i}].role is {message['role']!r}; expected one of "
                            f"{', '.join(CHAT_ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: {key}[{i}].content must be a string, got "
                            f"{type_name(message['content'])}")


def _check_messages(messages: Any, where: str) -> None:
    if messages is None:
        raise DataError(f"{where}: missing required field 'messages' (chat format)")
    check_message_list(messages, where, "messages")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be from the assistant (nothing to learn otherwise)")


def _extend(rendered: str, longer: str, where: str) -> str:
    """What `longer` adds to `rendered`; masks are exact only if the template never rewrites a prefix."""
    if not longer.startswith(rendered):
        raise DataError(f"{where}: the tokenizer's chat template is not prefix-stable; cannot mask prompts")
    return longer[len(rendered):]


def template_segments(messages: list[dict[str, str]], tokenizer: Any, where: str, trained: list[bool]) -> list[Segment]:
    """Each turn rendered with the chat template on top of the ones before it; an assistant
    turn's generation prompt (the template's 'assistant:' header) is prompt, its content is
    completion where `trained[i]` says so (the other turns are always prompt)."""
    pieces: list[Segment] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            pieces.append((_extend(rendered, prompt, where), False))
            rendered = prompt
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        pieces.append((_extend(rendered, full, where), message["role"] == "assistant" and trained[i]))
        rendered = full
    return [piece for piece in pieces if piece[0]]


class Chat:
    """Multi-turn conversations in the tokenizer's chat template."""

    name = "chat"
    adds_bos_eos = False
    axolotl_type: str | None = "chat_template"

    fields = ("messages",)

    def validate(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        messages = row.get("messages")
        _check_messages(messages, where)
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}

    def segments(self, fields: dict[str, Any], tokenizer: Any, where: str) -> list[Segment]:
        messages = fields["messages"]
        return template_segments(messages, tokenizer, where, [m["role"] == "assistant" for m in messages])

    def prompt_ids(self, tokenizer: Any, instruction: str, input_text: str) -> list[int]:
        """One user turn and the template's generation prompt."""
        messages = [{"role": "user", "content": chat_user_message(instruction, input_text)}]
        return encode(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


FORMAT = Chat()
