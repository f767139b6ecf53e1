"""Generation ends at every token a model uses to end a turn, not only the tokenizer's eos."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from finetune_trainer import evaluation
from finetune_trainer.data.formats import DEFAULT_TEMPLATE
from finetune_trainer.testing.tiny import CHATML_TEMPLATE, build_tiny_tokenizer

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n\n' }}{% endfor %}"
)
REFUSING_TEMPLATE = "{{ raise_exception('Conversation roles must alternate system/user/assistant') }}"
# Tokens the families add; Llama 3 marks <|eot_id|> special without listing it among the named ones.
EXTRA_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]
EXTRA_TOKENS += ["<start_of_turn>", "<end_of_turn>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("stops") / "tokenizer")


def family_tokenizer(folder: Path, template: str | None, eos: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in EXTRA_TOKENS])
    tokenizer.eos_token = eos
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize(
    ("template", "eos", "configured", "expected"),
    [
        pytest.param(CHATML_TEMPLATE, "<|im_end|>", "<|im_end|>", ["<|im_end|>"], id="chatml-instruct"),
        # A ChatML base model (Qwen, SmolLM2): eos is <|endoftext|>, turns end with <|im_end|>.
        pytest.param(
            CHATML_TEMPLATE,
            "<|endoftext|>",
            "<|endoftext|>",
            ["<|endoftext|>", "<|im_end|>"],
            id="chatml-base",
        ),
        # Llama 3 base: eos <|end_of_text|>, turns end with <|eot_id|> (special, but not a named token).
        pytest.param(
            LLAMA3_TEMPLATE, "<|end_of_text|>", None, ["<|eot_id|>", "<|end_of_text|>"], id="llama3-base"
        ),
        # Llama 3 instruct lists both in generation_config.eos_token_id.
        pytest.param(
            LLAMA3_TEMPLATE,
            "<|eot_id|>",
            ("<|end_of_text|>", "<|eot_id|>"),
            ["<|end_of_text|>", "<|eot_id|>"],
            id="llama3-instruct-list",
        ),
        pytest.param(GEMMA_TEMPLATE, "</s>", "</s>", ["</s>", "<end_of_turn>"], id="gemma"),
        pytest.param(LLAMA2_TEMPLATE, "</s>", None, ["</s>"], id="llama2-space-before-eos"),
        pytest.param(DEFAULT_TEMPLATE, "</s>", None, ["</s>"], id="default-template"),
        pytest.param(PLAIN_TEMPLATE, "</s>", None, ["</s>"], id="template-without-end-token"),
        pytest.param(None, "</s>", None, ["</s>"], id="no-template"),
        pytest.param(REFUSING_TEMPLATE, "</s>", "<|im_end|>", ["<|im_end|>", "</s>"], id="template-refuses"),
    ],
)
def test_stop_tokens(
    tokenizer_dir: Path,
    template: str | None,
    eos: str,
    configured: str | tuple[str, ...] | None,
    expected: list[str],
) -> None:
    tokenizer = family_tokenizer(tokenizer_dir, template, eos)
    ids: Any = None
    if isinstance(configured, str):
        ids = tokenizer.convert_tokens_to_ids(configured)
    elif configured is not None:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in configured]
    stops = evaluation.stop_token_ids(tokenizer, GenerationConfig(eos_token_id=ids))  # type: ignore[no-untyped-call]
    assert tokenizer.convert_ids_to_tokens(stops) == expected


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        pytest.param(CHATML_TEMPLATE, "<|im_end|>", id="chatml"),
        pytest.param(LLAMA3_TEMPLATE, "<|eot_id|>", id="llama3"),
        pytest.param(GEMMA_TEMPLATE, "<end_of_turn>", id="gemma"),
        pytest.param(LLAMA2_TEMPLATE, "</s>", id="llama2-after-a-space"),
        pytest.param(DEFAULT_TEMPLATE, "</s>", id="default-template"),
        pytest.param(PLAIN_TEMPLATE, None, id="no-special-token-after-the-turn"),
        pytest.param(REFUSING_TEMPLATE, None, id="template-refuses"),
        pytest.param(None, None, id="no-template"),
    ],
)
def test_end_of_turn_token(tokenizer_dir: Path, template: str | None, expected: str | None) -> None:
    tokenizer = family_tokenizer(tokenizer_dir, template, "</s>")
    found = evaluation.end_of_turn_token(tokenizer)
    assert (None if found is None else tokenizer.convert_ids_to_tokens(found)) == expected


def test_stop_tokens_without_a_generation_config(tokenizer_dir: Path) -> None:
    tokenizer = family_tokenizer(tokenizer_dir, CHATML_TEMPLATE, "</s>")
    stops = evaluation.stop_token_ids(tokenizer, None)
    assert tokenizer.convert_ids_to_tokens(stops) == ["<|im_end|>", "</s>"]


@pytest.mark.parametrize(
    ("new_tokens", "stops", "kept", "stopped"),
    [
        ([7, 8, 3], {3}, [7, 8], True),
        ([7, 8, 9], {3}, [7, 8, 9], False),  # ran to max_new_tokens
        ([3, 7], {3}, [], True),  # an empty answer still ended
        ([7, 2, 2, 2], {2}, [7], True),  # pad = eos fills the rest of the row
        ([7, 4, 0, 0], {2, 4}, [7], True),  # any stop token, then <pad>
        ([], {3}, [], False),
    ],
)
def test_until_stop(new_tokens: list[int], stops: set[int], kept: list[int], stopped: bool) -> None:
    assert evaluation.until_stop(new_tokens, stops) == (kept, stopped)


def steer_towards(model: Any, token: Any, bias: float) -> Any:
    """An untied output layer that favours `token` by `bias` logits."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.get_input_embeddings().weight)
        head.bias.zero_()
        head.bias[token] = bias
    model.lm_head = head
    return model


def test_a_chatml_base_model_stops_at_the_end_of_its_turn(tiny_model: Path, tmp_path: Path) -> None:
    """The tokenizer's eos is </s>, but the template ends turns with <|im_end|>, as trained."""
    folder = tmp_path / "base"
    shutil.copytree(tiny_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = "</s>"
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    steer_towards(model, tokenizer.convert_tokens_to_ids("<|im_end|>"), 50.0)

    [output] = evaluation.generate(model, tokenizer, [evaluation.user_prompt(tokenizer, "apple river")], 16)

    assert output.stopped and output.text == ""


@pytest.fixture(scope="module")
def smollm2_model(smollm2: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(smollm2)


@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>"], ids=["as-shipped", "base-model-eos"])
def test_smollm2_stops_at_im_end(smollm2: Path, smollm2_model: Any, eos: str) -> None:
    """SmolLM2-135M-Instruct answers and ends its turn; so it does when eos is the base model's
    <|endoftext|>, since the chat template's <|im_end|> ends the turn."""
    tokenizer, model = AutoTokenizer.from_pretrained(smollm2), smollm2_model
    tokenizer.eos_token = eos
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    limit = 48
    prompt = evaluation.user_prompt(tokenizer, "What is the capital of France?")

    [output] = evaluation.generate(model, tokenizer, [prompt], limit)

    assert output.stopped, output.text
    assert "Paris" in output.text
    assert len(tokenizer(output.text, add_special_tokens=False)["input_ids"]) < limit
