"""The FineTuneJob spec: what is accepted, what is refused and with which message, checked twice:
by the pydantic models (the operator) and by the CRD's CEL rules (the API server at apply time)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from finetune_operator import api

Spec = dict[str, Any]
SECRET_REF = {"name": "app-secrets", "key": "value"}

# (id, changes to the valid spec, a phrase both the model and the CEL rule must say)
REFUSED_BY_BOTH: list[tuple[str, dict[str, Any], str]] = [
    ("qlora-without-quantization", {"method": {"type": "qlora"}}, "4-bit quantization"),
    ("quantization-with-lora", {"method": {"type": "lora", "quantization": {"bits": 4}}}, "only to"),
    ("deepspeed-with-qlora", {"method": {"type": "qlora", "quantization": {}, "deepspeed": {}}}, "full"),
    ("deepspeed-with-auto", {"method": {"type": "auto", "deepspeed": {"stage": 2}}}, "deepspeed"),
    ("lora-block-with-full", {"method": {"type": "full", "lora": {"r": 8}}}, "lora"),
    ("two-nodes-lora", {"method": {"type": "lora"}, "resources": {"nodes": 2}}, "nodes"),
    ("two-nodes-auto", {"resources": {"nodes": 3}}, "needs spec.method.type full"),
    (
        "params-offload-stage2",
        {"method": {"type": "full", "deepspeed": {"stage": 2, "offload": "optimizer+params"}}},
        "stage 3",
    ),
    (
        "audio-qlora",
        {"dataset": {"format": "audio"}, "method": {"type": "qlora", "quantization": {}}},
        "audio",
    ),
    ("no-test-data", {"goal": {"heldOutTest": False}}, "goal.testFile"),
    ("held-out-with-empty-split", {"dataset": {"split": {"test": 0, "validation": 0.1}}}, "split.test"),
    ("split-too-large", {"dataset": {"split": {"validation": 0.3, "test": 0.3}}}, "at most 0.5"),
    (
        "criterion-metric-not-measured",
        {"goal": {"successCriteria": [{"metric": "token_f1", "atLeast": 0.5}]}},
        "goal.metrics",
    ),
    (
        "criterion-two-rules",
        {"goal": {"successCriteria": [{"metric": "eval_loss", "maxRegression": 0.0, "atMost": 2.0}]}},
        "exactly one of",
    ),
    ("criterion-no-rule", {"goal": {"successCriteria": [{"metric": "eval_loss"}]}}, "exactly one of"),
    ("token-as-value", {"env": [{"name": "HF_TOKEN", "value": "hf_abc"}]}, "looks like a secret"),
    ("lowercase-key-as-value", {"env": [{"name": "openai_api_key", "value": "x"}]}, "looks like a secret"),
    ("password-as-value", {"env": [{"name": "DB_PASSWORD", "value": "x"}]}, "secretKeyRef"),
    ("credential-as-value", {"env": [{"name": "GCP_CREDENTIALS", "value": "x"}]}, "secretKeyRef"),
    (
        "value-and-ref",
        {"env": [{"name": "MODE", "value": "a", "secretKeyRef": SECRET_REF}]},
        "exactly one of value or secretKeyRef",
    ),
    ("neither-value-nor-ref", {"env": [{"name": "MODE"}]}, "exactly one of value or secretKeyRef"),
    ("reserved-env", {"env": [{"name": "JOB_ID", "value": "forged"}]}, "set by the operator"),
    (
        "merge-with-full",
        {"method": {"type": "full"}, "output": {"mergeAdapter": True}},
        "set output.mergeAdapter: false",
    ),
    ("reserved-aws-env", {"env": [{"name": "AWS_ACCESS_KEY_ID", "secretKeyRef": SECRET_REF}]}, "operator"),
]


def model_error(spec: Spec) -> str:
    with pytest.raises(ValidationError) as caught:
        api.parse_spec(spec)
    return str(caught.value)


@pytest.mark.parametrize(
    ("changes", "phrase"), [c[1:] for c in REFUSED_BY_BOTH], ids=[c[0] for c in REFUSED_BY_BOTH]
)
def test_refused_by_model_and_by_cel(
    spec_dict: Callable[..., Spec], cel: Callable[..., list[str]], changes: dict[str, Any], phrase: str
) -> None:
    spec = spec_dict(**changes)
    assert phrase in model_error(spec)
    errors = cel({"spec": spec})
    assert errors, "the API server would accept this spec"
    assert any(phrase in e for e in errors), errors


# (id, changes, phrase in the model's error): refused by the schema's types, enums and bounds.
REFUSED_BY_SCHEMA: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-method", {"method": {"type": "dpo"}}, "method.type"),
    ("unknown-format", {"dataset": {"format": "csv"}}, "dataset.format"),
    ("unknown-metric", {"goal": {"metrics": ["bleu"]}}, "goal.metrics"),
    ("no-metrics", {"goal": {"metrics": []}}, "goal.metrics"),
    ("empty-task", {"goal": {"task": ""}}, "goal.task"),
    ("model-source-without-scheme", {"model": {"source": "Qwen/Qwen2.5-0.5B"}}, "model.source"),
    ("parameters-unparseable", {"model": {"parameters": "half a billion"}}, "model.parameters"),
    ("zero-epochs", {"hyperparameters": {"epochs": 0}}, "hyperparameters.epochs"),
    ("negative-lr", {"hyperparameters": {"learningRate": -1}}, "hyperparameters.learningRate"),
    ("too-many-nodes", {"method": {"type": "full"}, "resources": {"nodes": 65}}, "resources.nodes"),
    ("short-grace", {"terminationGracePeriodSeconds": 5}, "terminationGracePeriodSeconds"),
    ("bad-resume", {"resumeFrom": "gs://bucket/x"}, "resumeFrom"),
    ("bad-env-name", {"env": [{"name": "1BAD", "value": "x"}]}, "env.0.name"),
    ("typo-field", {"hyperparameter": {"epochs": 1}}, "hyperparameter"),
    (
        "secret-value-field",
        {"checkpoints": {"store": {"bucket": "b", "secretAccessKey": "x"}}},
        "secretAccessKey",
    ),
]


@pytest.mark.parametrize(
    ("changes", "phrase"), [c[1:] for c in REFUSED_BY_SCHEMA], ids=[c[0] for c in REFUSED_BY_SCHEMA]
)
def test_refused_by_schema(spec_dict: Callable[..., Spec], changes: dict[str, Any], phrase: str) -> None:
    assert phrase in model_error(spec_dict(**changes))


ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("minimal", {}),
    ("qlora-with-quantization", {"method": {"type": "qlora", "quantization": {"bits": 4}}}),
    (
        "full-two-nodes-zero3",
        {
            "method": {"type": "full", "deepspeed": {"stage": 3, "offload": "optimizer+params"}},
            "resources": {"nodes": 2},
        },
    ),
    ("test-file-instead-of-split", {"goal": {"heldOutTest": False, "testFile": "s3://data/test.jsonl"}}),
    (
        "secret-by-reference",
        {"env": [{"name": "HF_TOKEN", "secretKeyRef": SECRET_REF}, {"name": "LOG_LEVEL", "value": "debug"}]},
    ),
    (
        "criterion-on-listed-metric",
        {"goal": {"successCriteria": [{"metric": "rougeL", "minImprovement": 0.01}]}},
    ),
    ("cpu-only", {"resources": {"gpusPerNode": 0}}),
    ("qlora-merged", {"method": {"type": "qlora", "quantization": {}}, "output": {"mergeAdapter": True}}),
    ("auto-merged", {"output": {"mergeAdapter": True}}),
    ("resume-latest", {"resumeFrom": "latest", "userId": "alice"}),
]


@pytest.mark.parametrize("changes", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted_by_model_and_by_cel(
    spec_dict: Callable[..., Spec], cel: Callable[..., list[str]], changes: dict[str, Any]
) -> None:
    spec = spec_dict(**changes)
    api.parse_spec(spec)
    assert cel({"spec": spec}) == []


def test_defaults_fill_what_a_user_leaves_out(spec_dict: Callable[..., Spec]) -> None:
    spec = api.parse_spec(spec_dict())
    assert spec.method.type == api.MethodType.AUTO
    assert (spec.resources.nodes, spec.resources.gpus_per_node) == (1, 1)
    assert spec.dataset.preprocessing.dedupe == api.Dedupe.EXACT_AND_NEAR
    assert spec.dataset.split.test == 0.05
    assert spec.backoff_limit == 3
    assert spec.suspend is False


def test_spec_is_frozen_and_round_trips_in_camel_case(spec_dict: Callable[..., Spec]) -> None:
    spec = api.parse_spec(spec_dict(method={"type": "qlora", "quantization": {"bits": 4}}))
    with pytest.raises(ValidationError):
        spec.suspend = True
    dumped = spec.model_dump(mode="json", exclude_none=True)
    assert dumped["method"]["quantization"]["doubleQuant"] is True
    assert "allowSmallDataFullFineTune" in dumped["method"]
    assert api.parse_spec(dumped) == spec


def test_secret_looking_value_error_never_echoes_the_value(
    spec_dict: Callable[..., Spec], cel: Callable[..., list[str]]
) -> None:
    canary = "canary-7d1e4a"
    spec = spec_dict(env=[{"name": "API_KEY", "value": canary}])
    with pytest.raises(ValidationError) as caught:
        api.parse_spec(spec)
    # pydantic quotes the whole input object; the message our rule writes must not contain it.
    ours = [e["msg"] for e in caught.value.errors()]
    assert ours and all(canary not in m for m in ours)
    assert all(canary not in e for e in cel({"spec": spec}))


IMMUTABLE_CHANGES: list[tuple[str, dict[str, Any], str]] = [
    ("model", {"model": {"source": "hf://Qwen/Qwen2.5-1.5B"}}, "spec.model is immutable"),
    ("dataset", {"dataset": {"source": "s3://data/other.jsonl"}}, "spec.dataset is immutable"),
    ("method", {"method": {"type": "lora"}}, "spec.method is immutable"),
    ("user", {"userId": "mallory"}, "spec.userId"),
]


@pytest.mark.parametrize(
    ("changes", "phrase"), [c[1:] for c in IMMUTABLE_CHANGES], ids=[c[0] for c in IMMUTABLE_CHANGES]
)
def test_immutable_fields_cannot_change_after_creation(
    spec_dict: Callable[..., Spec], cel: Callable[..., list[str]], changes: dict[str, Any], phrase: str
) -> None:
    old = {"spec": spec_dict(userId="alice")}
    new = {"spec": spec_dict(**{"userId": "alice", **changes})}
    assert any(phrase in e for e in cel(new, old)), cel(new, old)


def test_mutable_fields_can_change(spec_dict: Callable[..., Spec], cel: Callable[..., list[str]]) -> None:
    old = {"spec": spec_dict()}
    assert cel({"spec": spec_dict(suspend=True, backoffLimit=5)}, old) == []
    # Explicitly writing the default method is not a change.
    assert cel({"spec": spec_dict(method={"type": "auto"})}, old) == []


def test_user_id_can_be_neither_added_nor_removed_after_creation(
    spec_dict: Callable[..., Spec], cel: Callable[..., list[str]]
) -> None:
    """The admission webhook records the creator at CREATE; an update could otherwise claim a job
    created without one (webhook off) for anybody."""
    added = cel({"spec": spec_dict(userId="mallory")}, {"spec": spec_dict()})
    removed = cel({"spec": spec_dict()}, {"spec": spec_dict(userId="alice")})
    assert any("spec.userId is recorded when the job is created" in e for e in added), added
    assert any("spec.userId is recorded when the job is created" in e for e in removed), removed
    assert cel({"spec": spec_dict(userId="alice")}, {"spec": spec_dict(userId="alice")}) == []
