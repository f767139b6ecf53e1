"""Dataset formats (alpaca, sharegpt, text) as chat messages or raw text, and the prompt template.

When the tokenizer has no chat template (a base model), DEFAULT_TEMPLATE is used:

    [bos]{system}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}{eos}\\n\\n

It is saved with the tokenizer (chat_template.jinja) in every checkpoint and in the final
artifact, and as prompt_template.jinja beside them. An assistant turn ends with eos, so the model
learns to end its answers there and generation stops at it (evaluation.stop_token_ids). A base
model often has no pad token either: eos pads, and the attention mask hides the padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_trainer.data.errors import DataError, show_sample

DEFAULT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
    "{% else %}{{ message['content'] + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}"
)

Message = dict[str, str]


@dataclass(frozen=True)
class Example:
    """One training example: chat messages (alpaca, sharegpt) or raw text."""

    messages: tuple[tuple[str, str], ...] = ()
    text: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def as_messages(self) -> list[Message]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def dedupe_text(self) -> str:
        return self.text if self.text is not None else "\n".join(c for _, c in self.messages)

    def prompt_messages(self) -> list[Message]:
        """Messages before the last assistant turn: what a user would send."""
        messages = self.as_messages()
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last]

    def answer(self) -> str:
        return next(c for role, c in reversed(self.messages) if role == "assistant")


def _required_str(record: Mapping[str, Any], key: str, where: str, fmt: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"{where}: {fmt} example needs a non-empty string field {key!r}: {show_sample(record)} "
            f"(fix: add {key!r} or choose the right dataset.format)"
        )
    return value


def from_alpaca(record: Mapping[str, Any], where: str) -> Example:
    instruction = _required_str(record, "instruction", where, "alpaca")
    output = _required_str(record, "output", where, "alpaca")
    extra = record.get("input") or ""
    user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    turns: list[tuple[str, str]] = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        turns.append(("system", record["system"]))
    return Example(messages=(*turns, ("user", user), ("assistant", output)))


def from_sharegpt(record: Mapping[str, Any], where: str, role_map: Mapping[str, str]) -> Example:
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"{where}: sharegpt example needs a non-empty 'conversations' list: {show_sample(record)}"
        )
    messages: list[tuple[str, str]] = []
    for turn in turns:
        if not isinstance(turn, Mapping):
            raise DataError(f"{where}: each conversation turn must be an object: {show_sample(turn)}")
        speaker = str(turn.get("from", turn.get("role", "")))
        content = turn.get("value", turn.get("content"))
        if speaker not in role_map:
            raise DataError(
                f"{where}: unknown speaker {speaker!r} (fix: add it to dataset.roleMap, "
                f"known: {sorted(role_map)})"
            )
        if not isinstance(content, str):
            raise DataError(f"{where}: turn from {speaker!r} has no text 'value': {show_sample(turn)}")
        messages.append((role_map[speaker], content))
    if not any(role == "assistant" for role, _ in messages):
        raise DataError(f"{where}: conversation has no assistant turn to learn from: {show_sample(record)}")
    return Example(messages=tuple(messages))


def from_text(record: Mapping[str, Any], where: str) -> Example:
    return Example(text=_required_str(record, "text", where, "text"))


def to_example(record: Mapping[str, Any], fmt: str, where: str, role_map: Mapping[str, str]) -> Example:
    if fmt == "alpaca":
        return from_alpaca(record, where)
    if fmt == "sharegpt":
        return from_sharegpt(record, where, role_map)
    if fmt == "text":
        return from_text(record, where)
    raise DataError(f"dataset.format: {fmt!r} is not a text format (fix: alpaca, sharegpt or text)")
