"""Full fine-tuning with DeepSpeed ZeRO-2 across two pods, and QLoRA, through the operator."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from localcluster import ClusterInfo
from localcluster.quickstart import BUCKET, s3_client
from localcluster.testing import pod_log, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
Status = Callable[[str], dict[str, Any]]

# Short runs: 30 steps, a checkpoint every 10; judged on held-out loss only.
SHORT = {
    "hyperparameters": {"epochs": 1, "maxSteps": 30, "learningRate": 0.003},
    "checkpoints": {"everySteps": 10},
    "goal": {"metrics": ["eval_loss"], "successCriteria": [{"metric": "eval_loss", "maxRegression": 0.0}]},
}
JOINED = re.compile(r"process group ready: rank (\d+) of world size (\d+), backend (\w+)")
LOSS = re.compile(r'progress: \{"step":(\d+),[^}]*"loss":([0-9.]+)')
METRICS_ON = re.compile(r"metrics on (\S+) port")


def finished(job_status: Status, name: str) -> dict[str, Any] | None:
    status = job_status(name)
    return status if status.get("phase") in ("Succeeded", "Failed") else None


def run_to_the_end(name: str, job_status: Status, pod_logs: Callable[[], str]) -> dict[str, Any]:
    status = wait_for(
        lambda: finished(job_status, name), 420, f"{name} to finish", interval=2, describe=pod_logs
    )
    assert status["phase"] == "Succeeded", (status, pod_logs())
    return status


def all_exited(core: client.CoreV1Api, namespace: str) -> list[Any] | None:
    pods = sorted(core.list_namespaced_pod(namespace).items, key=lambda p: p.metadata.name)
    return pods if pods and all(p.status.phase in ("Succeeded", "Failed") for p in pods) else None


def test_zero2_full_fine_tune_across_two_pods(
    launch: Any,
    job_status: Status,
    pod_logs: Callable[[], str],
    core: client.CoreV1Api,
    cluster: ClusterInfo,
    namespace: str,
) -> None:
    obj = launch(
        "ds-two",
        method={"type": "full", "deepspeed": {"stage": 2}, "allowSmallDataFullFineTune": True},
        resources={"nodes": 2, "gpusPerNode": 1},
        **SHORT,
    )
    status = run_to_the_end("ds-two", job_status, pod_logs)
    assert status["method"]["type"] == "full"

    # A pod's phase can trail the Job's completion by a moment.
    pods = wait_for(
        lambda: all_exited(core, namespace), 60, "both trainer pods to exit", interval=1, describe=pod_logs
    )
    assert [p.status.phase for p in pods] == ["Succeeded", "Succeeded"], [p.metadata.name for p in pods]
    logs = [pod_log(cluster.run_dir, namespace, p.metadata.name) for p in pods]
    joined = sorted(m.groups() for text in logs for m in JOINED.finditer(text))
    assert joined == [("0", "2", "gloo"), ("1", "2", "gloo")], joined
    served_on = [METRICS_ON.search(text) for text in logs]
    assert all(served_on), logs
    addresses = {m.group(1) for m in served_on if m}
    assert addresses == {p.status.pod_ip for p in pods} and len(addresses) == 2

    # Every rank trained: each logs the same (all-reduced) loss, and it fell.
    for text in logs:
        losses = [float(loss) for _, loss in LOSS.findall(text)]
        assert len(losses) >= 3 and losses[-1] < losses[0], text[-3000:]
    assert status["final"]["eval_loss"] < status["baseline"]["eval_loss"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 30

    # One uploader: a verified checkpoint and one final artifact with full weights.
    assert status["checkpoint"]["verified"] is True
    prefix = f"checkpoints/{namespace}/ds-two/{obj['metadata']['uid']}/"
    keys = [o["Key"] for o in s3_client(cluster).list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    assert [k for k in keys if "/checkpoints/" in k and k.endswith("/VERIFIED")], keys
    assert [k for k in keys if "/final/" in k and k.endswith("model.safetensors")], keys
    assert sum("rank 0 saves and reports" in text for text in logs) == 1


def test_qlora_job_succeeds(launch: Any, job_status: Status, pod_logs: Callable[[], str]) -> None:
    launch(
        "qlora",
        method={"type": "qlora", "quantization": {"bits": 4, "quantType": "nf4", "doubleQuant": True}},
        **SHORT,
    )
    status = run_to_the_end("qlora", job_status, pod_logs)
    assert status["method"]["type"] == "qlora"
    assert status["final"]["eval_loss"] < status["baseline"]["eval_loss"]
    assert status["checkpoint"]["verified"] is True
