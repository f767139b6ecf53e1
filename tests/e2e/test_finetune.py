"""A real fine-tune through the operator: apply the quickstart job (LoRA on SmolLM2-135M-Instruct,
the Unicode-name task) and check everything a user would look at: status, events, S3 objects,
metrics and the final artifact."""

from __future__ import annotations

import base64
import json
import unicodedata
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from finetune_trainer.testing import unicode_names
from localcluster import ClusterInfo
from localcluster.quickstart import BUCKET, s3_client
from localcluster.testing import events_for, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
Status = Callable[[str], dict[str, Any]]


def test_quickstart_job_succeeds_with_everything_a_user_checks(
    launch: Any,
    job_status: Status,
    pod_logs: Callable[[], str],
    core: client.CoreV1Api,
    cluster: ClusterInfo,
    operator: Any,
    namespace: str,
) -> None:
    obj = launch("support-bot", output={"mergeAdapter": True})
    status = wait_for(
        lambda: (s := job_status("support-bot")).get("phase") in ("Succeeded", "Failed") and s,
        600,
        "the job to finish",
        interval=2,
        describe=pod_logs,
    )
    assert status["phase"] == "Succeeded", (status, pod_logs())

    # The checklist's story, told by the status.
    assert status["method"]["type"] == "lora" and "on-prem" in status["method"]["reason"].lower()
    # Every example is kept: they share a system prompt and an instruction, which must not make
    # unrelated examples near duplicates.
    assert status["data"]["raw"] == len(unicode_names.records()) == status["data"]["examples"]
    assert status["data"]["nearDuplicatesRemoved"] == 0
    assert sum(status["data"]["split"].values()) == status["data"]["examples"]
    # The base model answers in sentences (exact match 0); the tuned one in the standard's names.
    assert status["final"]["exact_match"] > status["baseline"]["exact_match"], status
    assert status["final"]["eval_loss"] <= status["baseline"]["eval_loss"]
    samples = status["samples"]
    assert len(samples) == 3 and all(s["baseline"] is not None and s["final"] is not None for s in samples)
    assert all(s["reference"] == unicodedata.name(s["prompt"][-3]) for s in samples), samples
    assert status["checkpoint"]["verified"] is True
    assert status["startTime"] <= status["checkpoint"]["time"] <= status["completionTime"], status
    assert "merged weights saved under final/merged/" in status["message"]
    # The outcome names what was measured, e.g. "criterion met: exact_match 0 -> 1 (minImprovement 0.3)".
    assert "criterion met: exact_match 0 -> " in status["message"], status["message"]
    assert "criterion met: exact_match 0 -> 0 " not in status["message"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"] > 0
    assert status["predictions"]["failed"] == 0, status["predictions"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Complete"]["status"] == "True"
    assert conditions["PredictionsHealthy"]["status"] == "True"
    # No spec.model.parameters: the operator read the size from the model's own files in S3.
    assert "134.5M parameters (from " in conditions["MemoryFits"]["message"], conditions["MemoryFits"]

    reasons = [e.split(":")[0] for e in events_for(core, namespace, "support-bot")]
    assert {"MethodChosen", "CheckpointVerified", "Succeeded"} <= set(reasons)

    # Checkpoints and the final artifact are committed (manifest last) and verified in S3.
    prefix = f"checkpoints/{namespace}/support-bot/{obj['metadata']['uid']}/"
    keys = [o["Key"] for o in s3_client(cluster).list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    assert [k for k in keys if k.endswith("/VERIFIED")], keys
    assert any("/final/" in k and k.endswith("MANIFEST.json") for k in keys), keys
    assert any(k.endswith("/final/merged/model.safetensors") for k in keys), keys
    card = next(k for k in keys if k.endswith("/final/README.md"))
    card_text = s3_client(cluster).get_object(Bucket=BUCKET, Key=card)["Body"].read().decode()
    assert f"(uid `{obj['metadata']['uid']}`)" in card_text and "| exact_match |" in card_text

    # The operator's metrics know the job's phase.
    with urllib.request.urlopen(operator.metrics_url, timeout=5) as response:
        text = response.read().decode()
    assert f'finetune_job_phase{{job="support-bot",namespace="{namespace}",phase="Succeeded"}} 1.0' in text

    # The persistence key and the S3 secret show up nowhere a user (or an attacker) could read.
    persistence = core.read_namespaced_secret("persistence", namespace).data["serviceRoleKey"]
    secret_values = [cluster.s3_secret_key, base64.b64decode(persistence).decode()]
    surfaces = json.dumps(status) + " ".join(events_for(core, namespace, "support-bot")) + pod_logs()
    surfaces += operator.log_text() + text + card_text
    for value in secret_values:
        assert value not in surfaces
