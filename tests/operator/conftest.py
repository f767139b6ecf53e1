"""Fixtures for the operator's pure layers: a valid FineTuneJob spec to vary, and a small
evaluator that applies the generated CRD's defaults and CEL rules the way the API server does."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import celpy
import pytest
from celpy.adapter import json_to_cel

from finetune_operator import api, builders, policy
from finetune_operator.crd import build_crd
from finetune_operator.settings import OperatorSettings
from localcluster.testing import deep_merge

Spec = dict[str, Any]


def valid_spec() -> Spec:
    """A small, complete, valid spec (what a first-time user would write)."""
    return {
        "goal": {
            "task": "answer support tickets",
            "metrics": ["exact_match", "rougeL"],
            "successCriteria": [{"metric": "eval_loss", "maxRegression": 0.0}],
        },
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B", "parameters": "0.5B"},
        "dataset": {"source": "s3://data/tickets.jsonl", "format": "alpaca"},
        "checkpoints": {"store": {"bucket": "ckpt", "credentialsSecret": "s3-creds"}},
    }


@pytest.fixture
def spec_dict() -> Callable[..., Spec]:
    def make(**changes: Any) -> Spec:
        return deep_merge(valid_spec(), changes)

    return make


@pytest.fixture
def settings() -> OperatorSettings:
    return OperatorSettings(environment=api.Environment.AUTO, gpu_memory_gib=24.0)


@pytest.fixture
def job_ref() -> builders.JobRef:
    return builders.JobRef(name="support-bot", namespace="team-a", uid="0f3c-uid")


@pytest.fixture
def decision_for() -> Callable[[Spec, OperatorSettings], policy.MethodDecision]:
    def decide(spec: Spec, settings: OperatorSettings) -> policy.MethodDecision:
        return policy.resolve_method(api.parse_spec(spec), settings)

    return decide


# ---------------------------------------------------------------------------------------------
# A miniature of the API server's CRD handling: defaulting, then every CEL rule of every schema
# node present in the object (transition rules only where the old object has the node too).


def crd_schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    if schema.get("type") == "object" and isinstance(value, dict):
        out = dict(value)
        for name, sub in schema.get("properties", {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(sub, out[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            out = {k: apply_defaults(extra, v) for k, v in out.items()}
        return out
    if schema.get("type") == "array" and isinstance(value, list):
        return [apply_defaults(schema["items"], item) for item in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # the API server treats every `number` as a double in CEL
    return value


def _walk(
    schema: Mapping[str, Any], new: Any, old: Any, path: str
) -> Iterator[tuple[str, dict[str, str], Any, Any]]:
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule, new, old
    if schema.get("type") == "object" and isinstance(new, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in new:
                old_sub = old.get(name) if isinstance(old, dict) else None
                yield from _walk(sub, new[name], old_sub, f"{path}.{name}")
    elif schema.get("type") == "array" and isinstance(new, list):
        for index, item in enumerate(new):
            yield from _walk(schema["items"], item, None, f"{path}[{index}]")


_ENV = celpy.Environment()


def cel_errors(obj: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> list[str]:
    """Messages of the CEL rules a FineTuneJob (`{"spec": ...}`) violates after defaulting."""
    schema = crd_schema()
    new = apply_defaults(schema, dict(obj))
    previous = apply_defaults(schema, dict(old)) if old is not None else None
    errors: list[str] = []
    for path, rule, value, old_value in _walk(schema, new, previous, ""):
        transition = "oldSelf" in rule["rule"]
        if transition and old_value is None:
            continue
        activation = {"self": json_to_cel(value)}
        if transition:
            activation["oldSelf"] = json_to_cel(old_value)
        result = _ENV.program(_ENV.compile(rule["rule"])).evaluate(activation)
        if isinstance(result, Exception):
            raise result
        if not result:
            message = rule["message"]
            if "messageExpression" in rule:
                message = str(_ENV.program(_ENV.compile(rule["messageExpression"])).evaluate(activation))
            errors.append(f"{path or '<root>'}: {message}")
    return errors


@pytest.fixture
def cel() -> Callable[..., list[str]]:
    return cel_errors


@pytest.fixture
def schema() -> dict[str, Any]:
    """The openAPIV3Schema of the generated CRD."""
    return crd_schema()


@pytest.fixture
def crd_defaults() -> Callable[[Any], Any]:
    """Apply the CRD's defaults to a FineTuneJob object, as the API server does on write."""
    return lambda obj: apply_defaults(crd_schema(), obj)
