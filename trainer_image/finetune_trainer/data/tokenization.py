"""Tokenize examples with the model's tokenizer, mask prompts, and check the result on samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finetune_trainer.data.errors import DataError, show_sample
from finetune_trainer.data.formats import DEFAULT_TEMPLATE, Example, Message

IGNORE_INDEX = -100
MAX_UNKNOWN_RATE = 0.01  # more than 1% unknown tokens: the tokenizer does not fit the data
CHECK_SAMPLES = 64


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def ensure_template(tokenizer: Any) -> str:
    """The chat template used for training: the tokenizer's own, else DEFAULT_TEMPLATE."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_TEMPLATE
    return str(tokenizer.chat_template)


def check_special_tokens(tokenizer: Any) -> None:
    if tokenizer.eos_token is None:
        raise DataError(
            "tokenizer: no eos_token, so the model cannot learn where an answer ends "
            "(fix: set eos_token in the model's tokenizer_config.json)"
        )
    if tokenizer.pad_token is None:  # common for base models; padding never reaches the loss
        tokenizer.pad_token = tokenizer.eos_token


def render(tokenizer: Any, messages: list[Message], generation_prompt: bool = False) -> str:
    return str(
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    )


def _answer_spans(tokenizer: Any, messages: list[Message], full: str) -> list[tuple[int, int]]:
    """Character spans of assistant turns in the rendered conversation."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise DataError(
                "tokenizer.chat_template: rendering a conversation turn by turn does not give a prefix of "
                "the whole conversation, so prompt tokens cannot be masked "
                "(fix: use a template that renders turns in order, or dataset.trainOnPrompt: true)"
            )
        spans.append((len(prefix), len(upto)))
    return spans


def encode_chat(tokenizer: Any, example: Example, max_tokens: int, train_on_prompt: bool) -> Encoded:
    messages = example.as_messages()
    full = render(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    if train_on_prompt:
        labels = list(ids)
    else:
        spans = _answer_spans(tokenizer, messages, full)
        labels = [
            tok if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
            for tok, (start, _end) in zip(ids, enc["offset_mapping"], strict=True)
        ]
    truncated = len(ids) > max_tokens
    return Encoded(ids[:max_tokens], labels[:max_tokens], truncated)


def encode_text(tokenizer: Any, example: Example) -> Encoded:
    text = example.text or ""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    ids.append(tokenizer.eos_token_id)
    return Encoded(ids, list(ids))


def rendered_text(tokenizer: Any, example: Example) -> str:
    return example.text if example.text is not None else render(tokenizer, example.as_messages())


def check_round_trip(tokenizer: Any, examples: Sequence[Example]) -> None:
    for example in examples[:CHECK_SAMPLES]:
        text = rendered_text(tokenizer, example)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if " ".join(back.split()) != " ".join(text.split()):
            raise DataError(
                f"tokenizer: decoding does not reproduce the text: {show_sample(text)} "
                f"-> {show_sample(back)} "
                "(fix: use the model's own tokenizer, or normalize the data)"
            )


def check_unknown_rate(tokenizer: Any, examples: Sequence[Example], encoded: Sequence[Encoded]) -> None:
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    worst, worst_rate, total, unknown = 0, 0.0, 0, 0
    for i, enc in enumerate(encoded[:CHECK_SAMPLES]):
        count = enc.input_ids.count(unk)
        total, unknown = total + len(enc.input_ids), unknown + count
        if count / max(1, len(enc.input_ids)) > worst_rate:
            worst, worst_rate = i, count / len(enc.input_ids)
    if total and unknown / total > MAX_UNKNOWN_RATE:
        raise DataError(
            f"tokenizer: {unknown / total:.1%} of sampled tokens are unknown (limit {MAX_UNKNOWN_RATE:.0%}), "
            f"e.g. {show_sample(rendered_text(tokenizer, examples[worst]))} "
            "(fix: use the model's own tokenizer or clean the data's characters)"
        )


def check_loss_masks(tokenizer: Any, examples: Sequence[Example], encoded: Sequence[Encoded]) -> None:
    for example, enc in zip(examples, encoded, strict=True):
        if all(label == IGNORE_INDEX for label in enc.labels[1:]):
            reason = "its answer was cut off by truncation" if enc.truncated else "it has no answer tokens"
            raise DataError(
                f"data: an example has nothing to learn from because {reason}: "
                f"{show_sample(rendered_text(tokenizer, example))} "
                "(fix: raise dataset.chunking.maxTokens, shorten the prompt, or drop the example)"
            )


def encode_all(
    tokenizer: Any, examples: Sequence[Example], max_tokens: int, train_on_prompt: bool
) -> list[Encoded]:
    """Encode and validate; raises DataError with the offending sample."""
    check_special_tokens(tokenizer)
    check_round_trip(tokenizer, examples)
    encoded = [
        encode_text(tokenizer, ex)
        if ex.text is not None
        else encode_chat(tokenizer, ex, max_tokens, train_on_prompt)
        for ex in examples
    ]
    check_unknown_rate(tokenizer, examples, encoded)
    check_loss_masks(tokenizer, examples, encoded)
    return encoded
