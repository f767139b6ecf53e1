"""Shared fixtures: a tiny Llama model and tokenizer trained locally, and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from finetune_trainer.testing.tiny import build_tiny_model, build_tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide Llama with a ChatML chat template."""
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_model(root / "model", build_tiny_tokenizer(root / "tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_no_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-plain")
    return build_tiny_model(root / "model", build_tiny_tokenizer(root / "tokenizer", chat_template=None))
