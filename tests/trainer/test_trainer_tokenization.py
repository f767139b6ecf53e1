"""Prompt masking, templates, chunking and packing, and tokenizer checks, with the tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune_trainer.data.chunking import Chunk, PackedCollator, chunk_features, make_chunks, pack
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.formats import DEFAULT_TEMPLATE, Example, from_sharegpt
from finetune_trainer.data.tokenization import IGNORE_INDEX, Encoded, encode_all, encode_chat, ensure_template

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


def test_truncated_answer_stops_with_the_sample(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    long_prompt = Example(messages=(("user", "apple " * 80), ("assistant", "river")))
    with pytest.raises(DataError, match=r"answer was cut off by truncation: <\|im_start\|>user\napple apple"):
        encode_all(tokenizer, [long_prompt], 32, train_on_prompt=False)


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
