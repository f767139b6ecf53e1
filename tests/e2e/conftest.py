"""Fixtures for end-to-end runs: the quickstart's real model and data in S3 (and a tiny model for
tests of lifecycle mechanics), and ways to launch a FineTuneJob from examples/quickstart.yaml."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from localcluster import ClusterInfo
from localcluster.quickstart import (
    BUCKET,
    EXAMPLE,
    TINY_DATA_KEY,
    TINY_MODEL_KEY,
    ensure_secrets,
    upload_model_and_data,
    upload_tiny_assets,
)
from localcluster.testing import apply_yaml, deep_merge

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
Launch = Callable[..., dict[str, Any]]

# The quickstart job on a tiny model and a synthetic task it learns in a few seconds a step: for
# tests of what happens around training (kills, suspends, rotations, pods), not of what it learns.
TINY: dict[str, Any] = {
    "goal": {
        "task": "name the group (north or south) a list of words belongs to",
        "metrics": ["exact_match", "token_f1"],
        "successCriteria": [
            {"metric": "eval_loss", "maxRegression": 0.0},
            {"metric": "exact_match", "minImprovement": 0.3},
        ],
    },
    "model": {"source": f"s3://{BUCKET}/{TINY_MODEL_KEY}", "parameters": "0.1M"},
    "dataset": {"source": f"s3://{BUCKET}/{TINY_DATA_KEY}", "chunking": {"maxTokens": 128}},
    "hyperparameters": {"epochs": 2, "learningRate": 0.01, "batchSize": 16, "maxSteps": None},
    "validation": {
        "maxNewTokens": 8,
        "prompts": ["Which group do these words belong to? apple river stone"],
        "heldOutScenarios": [
            {"prompt": "Which group do these words belong to? anchor bishop candle dragon", "expect": "south"}
        ],
    },
}


@pytest.fixture(scope="session")
def assets(cluster: ClusterInfo) -> None:
    """The real model with its task, and the tiny model with its task, uploaded once per session."""
    upload_model_and_data(cluster)
    upload_tiny_assets(cluster)


@pytest.fixture
def launch(
    kube: client.ApiClient,
    core: client.CoreV1Api,
    cluster: ClusterInfo,
    operator: Any,
    assets: None,
    namespace: str,
) -> Launch:
    """Creates the quickstart job (with `spec` changes) in the test's namespace."""
    ensure_secrets(core, namespace, cluster)

    def create(name: str, **spec: Any) -> dict[str, Any]:
        doc = yaml.safe_load(EXAMPLE.read_text().replace("${S3_ENDPOINT}", cluster.s3_endpoint))
        doc["metadata"]["name"] = name
        doc["spec"] = deep_merge(doc["spec"], spec)
        apply_yaml(kube, yaml.safe_dump(doc), namespace)
        return get_job(kube, namespace, name)

    return create


@pytest.fixture
def launch_tiny(launch: Launch) -> Launch:
    """Creates the quickstart job on the tiny model (see TINY), with `spec` changes."""
    return lambda name, **spec: launch(name, **deep_merge(TINY, spec))


def get_job(kube: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = client.CustomObjectsApi(kube).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return obj


@pytest.fixture
def job_status(kube: client.ApiClient, namespace: str) -> Callable[[str], dict[str, Any]]:
    return lambda name: get_job(kube, namespace, name).get("status") or {}


@pytest.fixture
def pod_logs(cluster: ClusterInfo, namespace: str) -> Callable[..., str]:
    """Every pod's log in the namespace (by default its tail: what a failing wait should show)."""

    def read(tail: int | None = 2500) -> str:
        # Every pod that ever ran here, deleted ones included (a suspended job's pod is gone).
        logs = [
            p.read_text(errors="replace")
            for p in sorted(Path(cluster.run_dir).glob(f"pods/{namespace}_*/logs/*.log"))
        ]
        return "".join(log[-tail:] if tail else log for log in logs)

    return read
