"""Tokenize with the model's tokenizer, mask prompts, and drop examples that cannot be trained on."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from finetune_trainer.data.errors import DataError, exceeds, show_sample
from finetune_trainer.data.formats import DEFAULT_TEMPLATE, Example, Message

IGNORE_INDEX = -100
MAX_UNKNOWN_RATE = 0.01  # more than 1% unknown tokens: the tokenizer does not fit the data
CHECK_SAMPLES = 64


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


class BadExample(StrEnum):
    """Why an example is dropped; the key in the data report's badExampleReasons."""

    EMPTY_ANSWER = "emptyAnswer"
    ANSWER_TRUNCATED = "answerTruncated"
    NO_ANSWER_TOKENS = "noAnswerTokens"
    ROUND_TRIP = "roundTripChanged"


# reason -> (what is wrong, in a sentence about the example; the fix)
_EXPLAIN = {
    BadExample.EMPTY_ANSWER: ("its answer is empty", "fill in or remove the answer"),
    BadExample.ANSWER_TRUNCATED: (
        "its answer was cut off by truncation",
        "raise dataset.chunking.maxTokens, shorten the prompt, or drop the example",
    ),
    BadExample.NO_ANSWER_TOKENS: ("it has no answer tokens", "give the example an assistant answer"),
    BadExample.ROUND_TRIP: (
        "decoding its tokens does not reproduce the text",
        "use the model's own tokenizer, or set dataset.preprocessing.normalize: true",
    ),
}


@dataclass(frozen=True)
class Dropped:
    """One example left out: its index in the list checked, why, and a sample for messages."""

    index: int
    reason: BadExample
    sample: str


@dataclass
class Encoding:
    """The examples that can be trained on, with their indices, and those dropped."""

    encoded: list[Encoded] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)


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


def _encode_chat(
    tokenizer: Any, example: Example, max_tokens: int, train_on_prompt: bool
) -> tuple[str, list[int], Encoded]:
    """The rendered conversation, all its token ids, and the training features cut at max_tokens."""
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
    return full, ids, Encoded(ids[:max_tokens], labels[:max_tokens], truncated)


def encode_chat(tokenizer: Any, example: Example, max_tokens: int, train_on_prompt: bool) -> Encoded:
    return _encode_chat(tokenizer, example, max_tokens, train_on_prompt)[2]


def _encode_text(tokenizer: Any, example: Example) -> tuple[str, list[int], Encoded]:
    text = example.text or ""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    features = [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else list(ids)
    features.append(tokenizer.eos_token_id)
    return text, ids, Encoded(features, list(features))


def encode_text(tokenizer: Any, example: Example) -> Encoded:
    return _encode_text(tokenizer, example)[2]


def rendered_text(tokenizer: Any, example: Example) -> str:
    return example.text if example.text is not None else render(tokenizer, example.as_messages())


def round_trips(tokenizer: Any, text: str, ids: Sequence[int]) -> bool:
    """Decoding gives the text back, up to whitespace; else the tokenizer does not fit the text."""
    back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return " ".join(str(back).split()) == " ".join(text.split())


def bad_reason(encoded: Encoded, round_trip: bool) -> BadExample | None:
    """Why an encoded example cannot be trained on, or None when it can."""
    if not round_trip:
        return BadExample.ROUND_TRIP
    if all(label == IGNORE_INDEX for label in encoded.labels[1:]):
        return BadExample.ANSWER_TRUNCATED if encoded.truncated else BadExample.NO_ANSWER_TOKENS
    return None


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


def bad_examples_message(
    reasons: Mapping[str, int], checked: int, where: str, sample: Dropped | None = None
) -> str:
    """`where: 3 of 40 examples (7.5%) ...: 2 answerTruncated, 1 emptyAnswer; e.g. <why>: <sample>`."""
    bad = sum(reasons.values())
    counts = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
    text = (
        f"{where}: {bad} of {checked} examples ({bad / max(1, checked):.1%}) cannot be trained on: {counts}"
    )
    if sample is None:
        return text
    return f"{text}; e.g. {_EXPLAIN[sample.reason][0]}: {sample.sample}"


def refuse_bad_examples(
    reasons: Mapping[str, int], checked: int, max_share: float, where: str, sample: Dropped | None
) -> None:
    """Bad examples are dropped and counted; more than max_share of them means the data is wrong."""
    if not exceeds(sum(reasons.values()), checked, max_share):
        return
    fix = f"{_EXPLAIN[sample.reason][1]}; " if sample is not None else ""
    raise DataError(
        f"{bad_examples_message(reasons, checked, where, sample)}; that is above "
        f"dataset.preprocessing.maxBadExampleShare {max_share:g} "
        f"(fix: {fix}or raise dataset.preprocessing.maxBadExampleShare to train without them)"
    )


def reason_counts(dropped: Sequence[Dropped]) -> dict[str, int]:
    return dict(Counter(str(d.reason) for d in dropped))


def encode_all(
    tokenizer: Any, examples: Sequence[Example], max_tokens: int, train_on_prompt: bool
) -> Encoding:
    """Encode and check each example; one that cannot be trained on is dropped with its reason.

    A tokenizer that does not fit the data at all (no eos token, many unknown tokens) raises DataError.
    """
    check_special_tokens(tokenizer)
    result = Encoding()
    for i, example in enumerate(examples):
        if example.text is not None:
            text, ids, encoded = _encode_text(tokenizer, example)
        else:
            text, ids, encoded = _encode_chat(tokenizer, example, max_tokens, train_on_prompt)
        reason = bad_reason(encoded, round_trips(tokenizer, text, ids))
        if reason is None:
            result.encoded.append(encoded)
            result.kept.append(i)
        else:
            result.dropped.append(Dropped(i, reason, show_sample(text)))
    check_unknown_rate(tokenizer, [examples[i] for i in result.kept[:CHECK_SAMPLES]], result.encoded)
    return result
