"""Batched, left-padded generation gives what one prompt at a time gives; lengths follow the data."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune_trainer import evaluation
from finetune_trainer.data.formats import DEFAULT_TEMPLATE, Example
from finetune_trainer.data.tokenization import ensure_template
from finetune_trainer.testing.tiny import WORDS


@pytest.mark.parametrize(
    ("sequences", "ids", "mask"),
    [
        ([[5, 6, 7], [8]], [[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]]),
        ([[1, 2], [3, 4]], [[1, 2], [3, 4]], [[1, 1], [1, 1]]),
        ([[9]], [[9]], [[1]]),
        ([], [], []),
    ],
)
def test_left_pad(sequences: list[list[int]], ids: list[list[int]], mask: list[list[int]]) -> None:
    assert evaluation.left_pad(sequences, 0) == (ids, mask)


@pytest.mark.parametrize(
    ("pad", "eos", "unk", "stops", "expected"),
    [
        (0, 2, 3, [5], 0),
        (None, 2, 3, [5], 2),  # a base model without a pad token: eos, masked out
        (None, None, 3, [5], 3),
        (None, None, None, [5], 5),
    ],
)
def test_pad_token_id(
    pad: int | None, eos: int | None, unk: int | None, stops: list[int], expected: int
) -> None:
    tokenizer = SimpleNamespace(pad_token_id=pad, eos_token_id=eos, unk_token_id=unk)
    assert evaluation.pad_token_id(tokenizer, stops) == expected


def test_no_token_to_pad_with_names_the_fix() -> None:
    tokenizer = SimpleNamespace(pad_token_id=None, eos_token_id=None, unk_token_id=None)
    with pytest.raises(ValueError, match=r"tokenizer: no pad, eos or unk token \(fix: set eos_token"):
        evaluation.pad_token_id(tokenizer, [])


@pytest.mark.parametrize(
    ("configured", "references", "cap", "expected"),
    [
        (8, [100], 256, 8),  # the job's validation.maxNewTokens wins
        (400, [], 256, 400),
        (None, [3], 256, 3 + evaluation.MIN_MARGIN_TOKENS),  # short answers: at least 8 more
        (None, [40], 256, 50),  # a quarter more
        (None, [5, 60, 2], 256, 75),  # the longest
        (None, [300], 256, 256),  # capped
        (None, [60], 64, 64),
        (None, [], 256, 256),  # nothing to measure: the cap
    ],
)
def test_derived_max_new_tokens(
    configured: int | None, references: list[int], cap: int, expected: int
) -> None:
    assert evaluation.derived_max_new_tokens(configured, references, cap) == expected


def test_answer_tokens_measure_chat_answers_in_the_models_tokens(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = [
        Example(messages=(("user", "Which group?"), ("assistant", "north"))),
        Example(messages=(("user", "Which group?"), ("assistant", "apple river stone cloud"))),
        Example(text="a document has no reference answer"),
    ]
    lengths = evaluation.answer_tokens(tokenizer, examples)
    assert lengths == [
        len(tokenizer("north", add_special_tokens=False)["input_ids"]) + 1,
        len(tokenizer("apple river stone cloud", add_special_tokens=False)["input_ids"]) + 1,
    ]
    assert lengths[1] > lengths[0]


def varied_model(folder: Path, stop_token: Any) -> Any:
    """The tiny model with weights large enough that each prompt gets its own continuation, and a
    nudge towards `stop_token` so that some continuations end early and others run to the limit."""
    model: Any = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
        head.weight.copy_(model.get_input_embeddings().weight)
        head.bias.zero_()
        head.bias[stop_token] = 2.0
    model.lm_head = head
    return model


PROMPTS = [" ".join(WORDS[i : i + 1 + i % 7]) for i in range(16)]  # 1 to 7 words: unequal lengths


def seen(output: evaluation.Generation) -> tuple[str, str, bool]:
    return output.prompt, output.text, output.stopped


def assert_batches_match_one_at_a_time(model: Any, tokenizer: Any) -> None:
    prompts = [evaluation.user_prompt(tokenizer, p) for p in PROMPTS]
    side = tokenizer.padding_side
    one = [evaluation.generate(model, tokenizer, [p], 24, batch_size=1)[0] for p in prompts]
    assert {o.stopped for o in one} == {True, False}, "some end early, some run to the limit"
    assert len({o.text for o in one}) > len(one) // 2, "the continuations differ"
    for batch_size in (3, 16):
        batched = evaluation.generate(model, tokenizer, prompts, 24, batch_size=batch_size)
        assert [seen(o) for o in batched] == [seen(o) for o in one]
    assert tokenizer.padding_side == side


def test_batched_generation_equals_one_prompt_at_a_time(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = varied_model(tiny_model, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert_batches_match_one_at_a_time(model, tokenizer)


def test_a_base_model_without_template_or_pad_token_generates_in_batches(
    tiny_model_no_template: Path,
) -> None:
    """The default template ends turns with eos, and eos pads the batch: the mask hides it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_no_template)
    tokenizer.pad_token = None
    assert ensure_template(tokenizer) == DEFAULT_TEMPLATE
    model = varied_model(tiny_model_no_template, tokenizer.eos_token_id)
    model.generation_config.pad_token_id = None
    assert_batches_match_one_at_a_time(model, tokenizer)
    assert tokenizer.pad_token is None, "generation leaves the tokenizer as it was"
