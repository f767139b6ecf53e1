"""Every object the chart renders is accepted by a real API server (server-side dry-run)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from localcluster import ClusterInfo
from localcluster.testing import wait_for
from localcluster.tools import tool

FIXTURES = Path(__file__).parent / "fixtures"
CHART_CRDS = Path(__file__).resolve().parents[2] / "charts" / "finetune-operator" / "crds"

pytestmark = pytest.mark.cluster


def kubectl(cluster: ClusterInfo, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool("kubectl")), "--kubeconfig", cluster.kubeconfig, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def crds(cluster: ClusterInfo) -> None:
    """The FineTuneJob CRD (from the chart) and the prometheus-operator fixture CRDs, established."""
    for path in (CHART_CRDS, FIXTURES / "prometheus-operator-crds.yaml"):
        result = kubectl(cluster, "apply", "-f", str(path))
        assert result.returncode == 0, result.stderr
    names = [
        "finetunejobs.finetune.dev",
        "servicemonitors.monitoring.coreos.com",
        "podmonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
    ]

    def established() -> bool:
        out = kubectl(cluster, "get", "crd", *names, "-o", "json")
        items = json.loads(out.stdout)["items"] if out.returncode == 0 else []
        return len(items) == len(names) and all(
            any(
                c["type"] == "Established" and c["status"] == "True"
                for c in i["status"].get("conditions", [])
            )
            for i in items
        )

    wait_for(established, 30, "CRDs established")


@pytest.mark.parametrize(
    ("profile", "mode"),
    [("default", "cluster"), ("default", "namespaced"), ("onprem", "namespaced"), ("cloud", "cluster")],
)
def test_rendered_objects_pass_server_side_dry_run(
    cluster: ClusterInfo,
    crds: None,
    namespace: str,
    helm: Callable[..., Any],
    template_args: Callable[..., list[str]],
    profile: str,
    mode: str,
) -> None:
    sets = [f"operator.namespaces={{{namespace}}}"] if mode == "namespaced" else []
    args = template_args(profile, sets=[*sets, f"dashboards.namespace={namespace}"])
    args[args.index("--namespace") + 1] = namespace
    rendered = helm(*args)
    assert rendered.returncode == 0, rendered.stderr
    result = kubectl(
        cluster,
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        namespace,
        "-f",
        "-",
        stdin=rendered.stdout,
    )
    assert result.returncode == 0, result.stderr
    applied = result.stdout.splitlines()
    kinds = {line.split("/", 1)[0].split(".", 1)[0] for line in applied}
    assert {
        "deployment",
        "serviceaccount",
        "service",
        "configmap",
        "servicemonitor",
        "podmonitor",
        "prometheusrule",
    } <= kinds, applied
    assert (
        {"role", "rolebinding"} if mode == "namespaced" else {"clusterrole", "clusterrolebinding"}
    ) <= kinds
