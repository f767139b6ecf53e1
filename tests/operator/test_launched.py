"""Once launched, only spec.suspend may change: every other edit is named, never applied."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from finetune_operator import launched

SPEC: dict[str, Any] = {
    "model": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    "dataset": {"source": "s3://data/train.jsonl", "format": "alpaca"},
    "method": {"type": "auto"},
    "hyperparameters": {"learningRate": 0.0002, "epochs": 2},
    "suspend": False,
}


def edited(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    *parents, leaf = path.split(".")
    target = spec
    for key in parents:
        target = target.setdefault(key, {})
    if value is None:
        del target[leaf]
    else:
        target[leaf] = value
    return spec


@pytest.mark.parametrize(
    ("spec", "changed"),
    [
        (SPEC, []),
        (edited("suspend", True), []),
        (edited("hyperparameters.learningRate", 0.001), ["spec.hyperparameters.learningRate"]),
        (edited("hyperparameters.warmupRatio", 0.1), ["spec.hyperparameters.warmupRatio"]),
        (edited("hyperparameters.epochs", None), ["spec.hyperparameters.epochs"]),
        (edited("method.type", "full"), ["spec.method.type"]),
        (edited("env", [{"name": "A", "value": "b"}]), ["spec.env"]),
        # Deeper than two levels: the field two levels down is named.
        (edited("dataset.chunking", {"maxTokens": 512}), ["spec.dataset.chunking"]),
    ],
)
def test_changed_fields_name_what_differs_from_the_launch(spec: dict[str, Any], changed: list[str]) -> None:
    recorded = launched.recorded({"metadata": {"annotations": launched.annotation(SPEC)}})
    assert recorded is not None
    assert launched.changed_fields(recorded, spec) == changed


def test_the_record_is_small_and_holds_no_values() -> None:
    spec = edited("env", [{"name": "OPENAI_API_KEY", "value": "sk-canary-value"}])
    text = launched.annotation(spec)[launched.SPEC_ANNOTATION]
    assert "sk-canary" not in text and len(text) < 1024
    assert set(json.loads(text)) >= {"spec.env", "spec.model.source"}


def test_a_job_made_before_the_record_has_none() -> None:
    assert launched.recorded({"metadata": {"annotations": {}}}) is None
    assert launched.recorded({"metadata": {"annotations": {launched.SPEC_ANNOTATION: "not json"}}}) is None
