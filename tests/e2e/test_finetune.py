"""A real fine-tune through the operator: apply the quickstart job and check everything a user
would look at: status, events, S3 objects, metrics and the final artifact."""

from __future__ import annotations

import base64
import json
import urllib.request
from typing import Any

import pytest
import yaml
from kubernetes import client

from localcluster import ClusterInfo
from localcluster.quickstart import BUCKET, EXAMPLE, ensure_secrets, s3_client, upload_model_and_data
from localcluster.testing import apply_yaml, events_for, pod_log, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"


def quickstart_job(info: ClusterInfo, name: str) -> str:
    doc = yaml.safe_load(EXAMPLE.read_text().replace("${S3_ENDPOINT}", info.s3_endpoint))
    doc["metadata"]["name"] = name
    return yaml.safe_dump(doc)


def finished(kube: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    obj: dict[str, Any] = client.CustomObjectsApi(kube).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return obj if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None


def test_quickstart_job_succeeds_with_everything_a_user_checks(
    kube: client.ApiClient, core: client.CoreV1Api, cluster: ClusterInfo, operator: Any, namespace: str
) -> None:
    upload_model_and_data(cluster)
    ensure_secrets(core, namespace, cluster)
    apply_yaml(kube, quickstart_job(cluster, "support-bot"), namespace)

    def logs() -> str:
        pods = core.list_namespaced_pod(namespace).items
        return "".join(pod_log(cluster.run_dir, namespace, p.metadata.name)[-3000:] for p in pods)

    obj = wait_for(
        lambda: finished(kube, namespace, "support-bot"), 600, "the job to finish", interval=2, describe=logs
    )
    status = obj["status"]
    assert status["phase"] == "Succeeded", (status, logs())

    # The checklist's story, told by the status.
    assert status["method"]["type"] == "lora" and "on-prem" in status["method"]["reason"].lower()
    assert status["data"]["raw"] == 1500 and status["data"]["examples"] <= 1500
    assert sum(status["data"]["split"].values()) == status["data"]["examples"]
    assert status["final"]["exact_match"] >= status["baseline"]["exact_match"] + 0.3
    assert status["final"]["eval_loss"] <= status["baseline"]["eval_loss"]
    assert status["checkpoint"]["verified"] is True
    assert status["progress"]["step"] == status["progress"]["totalSteps"] > 0
    assert status["predictions"]["failed"] == 0
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["status"] == "True"

    reasons = [e.split(":")[0] for e in events_for(core, namespace, "support-bot")]
    assert {"MethodChosen", "CheckpointVerified", "Succeeded"} <= set(reasons)

    # Checkpoints and the final artifact are committed (manifest last) and verified in S3.
    uid = obj["metadata"]["uid"]
    prefix = f"checkpoints/{namespace}/support-bot/{uid}/"
    keys = [o["Key"] for o in s3_client(cluster).list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    verified = [k for k in keys if k.endswith("/VERIFIED")]
    assert verified, keys
    assert any(k.startswith(prefix + "final/") and k.endswith("MANIFEST.json") for k in keys), keys

    # The operator's metrics know the job's phase.
    with urllib.request.urlopen(operator.metrics_url, timeout=5) as response:
        text = response.read().decode()
    assert f'finetune_job_phase{{job="support-bot",namespace="{namespace}",phase="Succeeded"}} 1.0' in text

    # The persistence key and the S3 secret never show up anywhere a user or an attacker could read.
    persistence = core.read_namespaced_secret("persistence", namespace).data["serviceRoleKey"]
    secret_values = [cluster.s3_secret_key, base64.b64decode(persistence).decode()]
    surfaces = json.dumps(status) + " ".join(events_for(core, namespace, "support-bot")) + logs()
    surfaces += operator.log_text()
    for value in secret_values:
        assert value not in surfaces
