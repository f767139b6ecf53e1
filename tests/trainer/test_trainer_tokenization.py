"""Prompt masking, templates, chunking and packing, and tokenizer checks, with the tiny tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune_trainer.config import Dataset, Preprocessing, S3Store, Split
from finetune_trainer.data.chunking import Chunk, PackedCollator, chunk_features, make_chunks, pack
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.formats import DEFAULT_TEMPLATE, Example, from_sharegpt
from finetune_trainer.data.pipeline import clean_and_split, has_empty_answer, tokenize_splits
from finetune_trainer.data.tokenization import (
    IGNORE_INDEX,
    BadExample,
    Dropped,
    Encoded,
    bad_reason,
    encode_all,
    encode_chat,
    ensure_template,
    reason_counts,
    refuse_bad_examples,
)
from finetune_trainer.testing.tiny import synthetic_dataset, write_jsonl

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CONVERSATION = {
    "conversations": [
        {"from": "system", "value": "Answer with one word."},
        {"from": "human", "value": "Which word comes last? apple river"},
        {"from": "gpt", "value": "river"},
        {"from": "human", "value": "And first?"},
        {"from": "gpt", "value": "apple"},
    ]
}


def labelled_text(tokenizer: object, encoded: Encoded) -> str:
    ids = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    return tokenizer.decode(ids)  # type: ignore[attr-defined]


def test_sharegpt_only_assistant_turns_carry_loss(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    example = from_sharegpt(CONVERSATION, "example 1", ROLES)
    encoded = encode_chat(tokenizer, example, 256, train_on_prompt=False)
    assert labelled_text(tokenizer, encoded) == "river<|im_end|>\napple<|im_end|>\n"
    assert not encoded.truncated


def test_train_on_prompt_puts_loss_on_every_token(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    encoded = encode_chat(tokenizer, from_sharegpt(CONVERSATION, "e", ROLES), 256, train_on_prompt=True)
    assert encoded.labels == encoded.input_ids


def test_default_template_when_tokenizer_has_none(tiny_model_no_template: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_no_template)
    assert ensure_template(tokenizer) == DEFAULT_TEMPLATE
    example = Example(messages=(("user", "Which word comes last? apple river"), ("assistant", "river")))
    encoded = encode_chat(tokenizer, example, 256, train_on_prompt=False)
    rendered = tokenizer.decode(encoded.input_ids)
    assert (
        rendered == "<s>### Instruction:\nWhich word comes last? apple river\n\n### Response:\nriver</s>\n\n"
    )
    assert labelled_text(tokenizer, encoded) == "river</s>\n\n"


LONG_PROMPT = Example(messages=(("user", "apple " * 80), ("assistant", "river")))
SHORT = Example(messages=(("user", "Which word comes last? apple river"), ("assistant", "river")))


def test_a_truncated_answer_is_dropped_with_its_reason(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    result = encode_all(tokenizer, [SHORT, LONG_PROMPT, SHORT], 32, train_on_prompt=False)
    assert result.kept == [0, 2] and len(result.encoded) == 2
    [dropped] = result.dropped
    assert (dropped.index, dropped.reason) == (1, BadExample.ANSWER_TRUNCATED)
    assert dropped.sample.startswith("<|im_start|>user\napple apple")


def test_too_many_truncated_answers_stop_with_the_sample(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    result = encode_all(tokenizer, [LONG_PROMPT], 32, train_on_prompt=False)
    with pytest.raises(DataError) as refused:
        refuse_bad_examples(reason_counts(result.dropped), 1, 0.05, "dataset.source", result.dropped[0])
    message = str(refused.value)
    assert message.startswith(
        "dataset.source: 1 of 1 examples (100.0%) cannot be trained on: 1 answerTruncated"
    )
    assert "its answer was cut off by truncation: <|im_start|>user\napple apple" in message
    assert (
        "above dataset.preprocessing.maxBadExampleShare 0.05 (fix: raise dataset.chunking.maxTokens"
        in message
    )


def test_a_text_the_tokenizer_cannot_give_back_is_dropped(tiny_model: Path) -> None:
    from tokenizers import normalizers

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.backend_tokenizer.normalizer = normalizers.NFKC()  # as some real tokenizers do
    fullwidth = Example(messages=(("user", "Which word comes last? \uff21\uff22"), ("assistant", "\uff22")))
    result = encode_all(tokenizer, [SHORT, fullwidth], 64, train_on_prompt=False)
    assert result.kept == [0]
    assert [(d.index, d.reason) for d in result.dropped] == [(1, BadExample.ROUND_TRIP)]


@pytest.mark.parametrize(
    ("labels", "truncated", "round_trip", "reason"),
    [
        ([IGNORE_INDEX, IGNORE_INDEX, 7], False, True, None),
        ([IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], True, True, BadExample.ANSWER_TRUNCATED),
        ([IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], False, True, BadExample.NO_ANSWER_TOKENS),
        ([7, IGNORE_INDEX], False, True, BadExample.NO_ANSWER_TOKENS),  # the first token is never predicted
        ([IGNORE_INDEX, 7], False, False, BadExample.ROUND_TRIP),
    ],
)
def test_bad_reason(labels: list[int], truncated: bool, round_trip: bool, reason: BadExample | None) -> None:
    assert bad_reason(Encoded([1] * len(labels), labels, truncated), round_trip) == reason


@pytest.mark.parametrize(
    ("bad", "checked", "share", "refused"),
    [
        (0, 0, 0.0, False),
        (0, 100, 0.0, False),
        (1, 100, 0.0, True),
        (5, 100, 0.05, False),  # up to the share is dropped and counted
        (6, 100, 0.05, True),
        (100, 100, 1.0, False),
    ],
)
def test_bad_example_share(bad: int, checked: int, share: float, refused: bool) -> None:
    sample = Dropped(0, BadExample.EMPTY_ANSWER, '{"output": ""}')
    reasons = {"emptyAnswer": bad} if bad else {}
    if refused:
        with pytest.raises(DataError, match=r"its answer is empty: \{\"output\": \"\"\}.*maxBadExampleShare"):
            refuse_bad_examples(reasons, checked, share, "dataset.source", sample)
    else:
        refuse_bad_examples(reasons, checked, share, "dataset.source", sample)


@pytest.mark.parametrize(
    ("record", "fmt", "empty"),
    [
        ({"instruction": "q", "output": "a"}, "alpaca", False),
        ({"instruction": "q", "output": " \n"}, "alpaca", True),
        ({"instruction": "q"}, "alpaca", False),  # a missing field is a format mistake, refused later
        ({"text": ""}, "text", True),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
            "sharegpt",
            True,
        ),
        (
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
            "sharegpt",
            False,
        ),
    ],
)
def test_has_empty_answer(record: dict[str, Any], fmt: str, empty: bool) -> None:
    assert has_empty_answer(record, fmt, ROLES | {"user": "user", "assistant": "assistant"}) is empty


def _bad_data(tmp_path: Path, max_share: float) -> Dataset:
    """40 good training examples and an empty answer; 4 good test examples and a truncated answer."""
    train = [*synthetic_dataset(40, seed=5), {"instruction": "Which group?", "output": "\u200b"}]
    test = [*synthetic_dataset(4, seed=6), {"instruction": "apple " * 80, "output": "river"}]
    return Dataset(
        source=str(write_jsonl(train, tmp_path / "train.jsonl")),
        test_source=str(write_jsonl(test, tmp_path / "test.jsonl")),
        split=Split(validation=0.1, test=0.0),
        preprocessing=Preprocessing(max_bad_example_share=max_share),
    )


def test_bad_examples_are_dropped_and_counted_in_the_report(tiny_model: Path, tmp_path: Path) -> None:
    ds = _bad_data(tmp_path, 0.05)
    data = tokenize_splits(clean_and_split(ds, S3Store()), AutoTokenizer.from_pretrained(tiny_model), ds, 64)
    report = data.report
    assert (report.bad_examples_dropped, report.bad_example_reasons) == (
        2,
        {"emptyAnswer": 1, "answerTruncated": 1},
    )
    assert (report.split.train, report.split.validation, report.split.test, report.examples) == (36, 4, 4, 44)
    assert (len(data.validation_examples), len(data.test_examples)) == (4, 4)
    cleaning_stage, tokenization_stage = report.warnings
    where = "dataset.source and dataset.testSource"
    assert cleaning_stage.startswith(
        f"{where}: 1 of 46 examples (2.2%) cannot be trained on: 1 emptyAnswer; e.g. its answer is empty"
    )
    assert tokenization_stage.startswith(
        f"{where}: 1 of 45 examples (2.2%) cannot be trained on: 1 answerTruncated; e.g. its answer was"
    )


def test_more_bad_examples_than_the_share_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    ds = _bad_data(tmp_path, 0.03)
    clean = clean_and_split(ds, S3Store())  # 1 of 46 empty: under the share
    with pytest.raises(DataError, match=r"(?s)2 of 46 examples \(4.3%\) .*maxBadExampleShare 0.03"):
        tokenize_splits(clean, AutoTokenizer.from_pretrained(tiny_model), ds, 64)


def test_tokenizer_without_eos_is_refused(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.eos_token = None
    example = Example(messages=(("user", "q"), ("assistant", "a")))
    with pytest.raises(DataError, match="no eos_token"):
        encode_all(tokenizer, [example], 64, train_on_prompt=False)


def test_high_unknown_token_rate_is_refused(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    example = Example(text="apple river")
    encoded = Encoded([tokenizer.unk_token_id] * 5 + [10], [10] * 6)
    from finetune_trainer.data.tokenization import check_unknown_rate

    with pytest.raises(DataError, match="unknown"):
        check_unknown_rate(tokenizer, [example], [encoded])


def _enc(n: int, start: int = 10) -> Encoded:
    ids = list(range(start, start + n))
    return Encoded(ids, ids)


def test_packing_fills_chunks_without_exceeding_max_tokens() -> None:
    chunks = pack([_enc(n) for n in (60, 50, 40, 30, 20, 10)], 64)
    # best fit decreasing: 60 | 50+10 | 40+20 | 30
    assert sorted(len(c) for c in chunks) == [30, 60, 60, 60]


def test_packing_puts_an_item_in_the_oldest_of_equally_full_chunks() -> None:
    chunks = pack([_enc(40, start=1), _enc(40, start=2), _enc(20, start=3), _enc(15, start=4)], 60)
    assert [[s.input_ids[0] for s in c.segments] for c in chunks] == [[1, 3], [2, 4]]


def test_long_text_is_split_not_cut() -> None:
    chunks = make_chunks([_enc(100)], 32, packing=False)
    assert [len(c) for c in chunks] == [32, 32, 32, 4]


def test_packed_examples_do_not_attend_to_each_other(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.use_cache = False
    model.eval()
    a, b = _enc(5, 10), _enc(4, 20)
    collate = PackedCollator(pad_token_id=0)
    packed = collate([chunk_features(Chunk([a, b]))])
    alone = collate([chunk_features(Chunk([b])), chunk_features(Chunk([a]))])  # row 0 padded
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        alone_logits = model(input_ids=alone["input_ids"], position_ids=alone["position_ids"]).logits
    torch.testing.assert_close(packed_logits[5:], alone_logits[0, :4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed_logits[:5], alone_logits[1], atol=1e-5, rtol=1e-4)
    assert packed["labels"][0, 5].item() == IGNORE_INDEX  # no prediction across the boundary
    assert alone["labels"][0, 4].item() == IGNORE_INDEX  # padding carries no loss
