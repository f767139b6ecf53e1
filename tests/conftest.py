"""Shared fixtures: the local cluster (session), a namespace per test, and the operator."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client

from localcluster import ClusterInfo, MissingToolError, add_scrape_target, models, scrape_interval
from localcluster.operators import SOLO_PREFIX, start_operator
from localcluster.processes import free_port
from localcluster.s3 import S3Server, running_s3
from localcluster.testing import unique_name, wait_for
from localcluster.tools import REPO_ROOT, tool

pytest_plugins = ["localcluster.pytest_plugin"]

CRD_FILE = REPO_ROOT / "crds" / "finetune.dev_finetunejobs.yaml"


@dataclass(frozen=True)
class RunningOperator:
    log: Path
    metrics_url: str
    health_url: str

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (built once from its PyPI wheel, then cached)."""
    return models.ensure(models.SMOLLM2)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A standalone S3 server (versitygw) for tests that need real S3 but no cluster."""
    try:
        tool("versitygw")
    except MissingToolError as exc:
        pytest.skip(str(exc))
    with running_s3(tmp_path_factory.mktemp("s3"), key_prefix="test") as server:
        yield server


@pytest.fixture(scope="session")
def crd(cluster: ClusterInfo, kube: client.ApiClient) -> None:
    """The generated CRD, installed and Established."""
    subprocess.run(
        [
            str(tool("kubectl")),
            "--kubeconfig",
            cluster.kubeconfig,
            "apply",
            "--server-side",
            "-f",
            str(CRD_FILE),
        ],
        check=True,
        capture_output=True,
    )
    ext = client.ApiextensionsV1Api(kube)

    def established() -> bool:
        conditions = ext.read_custom_resource_definition("finetunejobs.finetune.dev").status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_for(established, 30, "the FineTuneJob CRD to be Established")


@pytest.fixture(scope="session")
def operator(cluster: ClusterInfo, crd: None) -> Iterator[RunningOperator]:
    """`python -m finetune_operator` against the session cluster, scraped by its Prometheus. It
    holds a leader Lease as the chart's replicas do, and skips `solo-` namespaces (`solo_namespace`)."""
    metrics_port = free_port()
    env = {
        "FINETUNE_OPERATOR_METRICS_PORT": str(metrics_port),
        "FINETUNE_OPERATOR_ENVIRONMENT": "onprem",
        "FINETUNE_OPERATOR_GPU_MEMORY_GIB": "80",
        "FINETUNE_OPERATOR_HEARTBEAT_NAMESPACE": "default",
        "FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE": "default",
        "FINETUNE_OPERATOR_SKIP_NAMESPACES": f"{SOLO_PREFIX}*",
        # Finished trainers linger for one scrape of the local Prometheus, not the chart's 15 s.
        "FINETUNE_OPERATOR_TRAINER_SCRAPE_INTERVAL": scrape_interval(Path(cluster.run_dir)),
    }
    running = start_operator(cluster, Path(cluster.run_dir) / "logs" / "operator.log", env, pdeathsig="TERM")
    try:
        add_scrape_target(Path(cluster.run_dir), "host", f"127.0.0.1:{metrics_port}", {})
        yield RunningOperator(
            log=running.log,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            health_url=f"http://127.0.0.1:{running.health_port}/healthz",
        )
    finally:
        running.stop()


@pytest.fixture
def solo_namespace(kube: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace that the session's operator leaves alone: for tests that run their own."""
    core = client.CoreV1Api(kube)
    base = "".join(ch for ch in request.node.name.lower().replace("_", "-") if ch.isalnum() or ch == "-")
    name = unique_name(f"{SOLO_PREFIX}{base[:34].strip('-')}")
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: core.read_namespaced_service_account("default", name), 30, f"default SA in {name}")
    yield name
    core.delete_namespace(name, propagation_policy="Background")
