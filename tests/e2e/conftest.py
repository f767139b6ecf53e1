"""Fixtures for end-to-end runs: the quickstart's tiny model and data in S3, and a way to launch
a FineTuneJob from examples/quickstart.yaml with changes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from localcluster import ClusterInfo
from localcluster.quickstart import EXAMPLE, ensure_secrets, upload_model_and_data
from localcluster.testing import apply_yaml, deep_merge

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
Launch = Callable[..., dict[str, Any]]


@pytest.fixture(scope="session")
def tiny_assets(cluster: ClusterInfo) -> None:
    """The tiny model and the learnable dataset, uploaded once per session."""
    upload_model_and_data(cluster)


@pytest.fixture
def launch(
    kube: client.ApiClient,
    core: client.CoreV1Api,
    cluster: ClusterInfo,
    operator: Any,
    tiny_assets: None,
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
