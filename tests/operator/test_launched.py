"""Once launched, only spec.suspend may change: every other edit is named, never applied."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from finetune_operator import api, builders, launched, policy
from finetune_operator.settings import OperatorSettings

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


LAUNCHED = {"spec": SPEC, "status": {"launchTime": "2026-12-01T10:00:00Z", "method": {"type": "lora"}}}
REFUSED_BEFORE_LAUNCH = {"spec": SPEC, "status": {"phase": "Failed", "method": {"type": "lora"}}}


@pytest.mark.parametrize(
    ("old", "spec", "refused"),
    [
        (LAUNCHED, edited("suspend", True), None),  # suspend is the one field that applies
        (LAUNCHED, SPEC, None),  # metadata-only updates
        (LAUNCHED, edited("hyperparameters.learningRate", 0.001), "spec.hyperparameters.learningRate"),
        (LAUNCHED, edited("env", [{"name": "A", "value": "b"}]), "spec.env"),
        # Before launch, or refused before launch, an edit is how the user fixes the job.
        ({"spec": SPEC}, edited("hyperparameters.learningRate", 0.001), None),
        (REFUSED_BEFORE_LAUNCH, edited("hyperparameters.learningRate", 0.001), None),
        (None, SPEC, None),
    ],
)
def test_edits_of_a_launched_spec_are_refused_at_admission(
    old: dict[str, Any] | None, spec: dict[str, Any], refused: str | None
) -> None:
    problem = launched.edit_refusal(old, spec)
    if refused is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(f"{refused} cannot change")
        assert "only spec.suspend may change once launched; fix:" in problem


def test_the_record_is_small_and_holds_no_values() -> None:
    spec = edited("env", [{"name": "OPENAI_API_KEY", "value": "sk-canary-value"}])
    text = launched.annotation(spec)[launched.SPEC_ANNOTATION]
    assert "sk-canary" not in text and len(text) < 1024
    assert set(json.loads(text)) >= {"spec.env", "spec.model.source"}


def test_a_job_made_before_the_record_has_none() -> None:
    assert launched.recorded({"metadata": {"annotations": {}}}) is None
    assert launched.recorded({"metadata": {"annotations": {launched.SPEC_ANNOTATION: "not json"}}}) is None


def launched_children(settings_changes: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], Any]:
    spec = api.parse_spec(
        {
            **{k: v for k, v in SPEC.items() if k != "hyperparameters"},
            "goal": {"task": "answer tickets", "metrics": ["exact_match"]},
            "model": {"source": "hf://Qwen/Qwen2.5-0.5B", "parameters": "0.5B"},
            "checkpoints": {"store": {"bucket": "ckpt"}},
        }
    )
    ref = builders.JobRef(name="bot", namespace="ns", uid="u1")
    settings = OperatorSettings(gpu_memory_gib=24)
    decision = policy.resolve_method(spec, settings)
    at_launch = builders.build_children(ref, spec, decision, settings, is_cloud=True)
    job = next(c for c in at_launch if c["kind"] == "Job")
    status = {"method": {"type": decision.type.value, "reason": decision.reason}}
    recorded = launched.decision_from_status(status)
    assert recorded is not None and launched.launched_in_cloud(job)
    later = OperatorSettings(gpu_memory_gib=24, **(settings_changes or {}))
    return builders.build_children(ref, spec, recorded, later, is_cloud=True), job


def test_missing_children_are_restored_as_launched_but_never_the_job() -> None:
    children, job = launched_children()
    restorable, problem = launched.restorable(children, job)
    assert [c["kind"] for c in restorable] == [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "ConfigMap",
        "NetworkPolicy",
    ]
    assert problem == ""


def test_a_config_that_would_differ_from_the_launched_one_is_not_restored() -> None:
    children, job = launched_children({"trainer_metrics_port": 9500})
    restorable, problem = launched.restorable(children, job)
    assert "ConfigMap bot-config cannot be re-created as the Job's pods read it" in problem
    assert "bot-config" not in [c["metadata"]["name"] for c in restorable]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({}, None),
        ({"method": {"type": "auto"}}, None),
        ({"method": {"type": "qlora", "reason": "on-prem"}}, ("qlora", None)),
        ({"method": {"type": "full", "reason": "cloud", "deepspeedStage": 3}}, ("full", 3)),
    ],
)
def test_the_method_decided_at_launch_is_read_back(
    status: dict[str, Any], expected: tuple[str, int | None] | None
) -> None:
    decision = launched.decision_from_status(status)
    assert (None if decision is None else (decision.type.value, decision.deepspeed_stage)) == expected
