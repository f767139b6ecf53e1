"""pytest fixtures: one local cluster per session, a fresh namespace per test.

Enable with `pytest_plugins = ["localcluster.pytest_plugin"]` in a conftest."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from localcluster.cluster import ClusterInfo, ClusterOptions, LocalCluster
from localcluster.testing import unique_name, wait_for


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterInfo]:
    """A running local cluster shared by the session; stopped (nothing left running) at the end."""
    run_dir = Path(os.environ.get("LOCALCLUSTER_TEST_RUN_DIR") or tmp_path_factory.mktemp("localcluster"))
    options = ClusterOptions(run_dir=run_dir, tie_to_parent=True)
    with LocalCluster(options) as info:
        yield info


@pytest.fixture(scope="session")
def kube(cluster: ClusterInfo) -> client.ApiClient:
    """An admin API client for the session's cluster."""
    return config.new_client_from_config(cluster.kubeconfig)


@pytest.fixture
def core(kube: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(kube)


@pytest.fixture
def namespace(kube: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace unique to the test, ready for pods, deleted afterwards."""
    core = client.CoreV1Api(kube)
    base = request.node.name.lower().replace("_", "-")
    name = unique_name("".join(ch for ch in base if ch.isalnum() or ch == "-")[:40].strip("-"))
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: core.read_namespaced_service_account("default", name), 30, f"default SA in {name}")
    yield name
    core.delete_namespace(name, propagation_policy="Background")
