"""A job's life beyond the happy path: crashes resume from the last verified checkpoint, suspend
and resume, deletion mid-run, and a model that misses its success criteria."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_trainer.testing.tiny import distinct_records, write_jsonl
from localcluster import ClusterInfo
from localcluster.quickstart import BUCKET, s3_client
from localcluster.testing import events_for, wait_for
from localcluster.tools import REPO_ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
Status = Callable[[str], dict[str, Any]]

# Long enough to interrupt, short enough for a test: about 250 steps, a checkpoint every 20.
LONGER = {"hyperparameters": {"epochs": 3}, "checkpoints": {"everySteps": 20}}
STOPS_WITHIN_S = 20.0  # SIGTERM to a stopped trainer, through the Job controller and the node
NAN_STEP = 10  # a logging step (every 10 by default)


def trainer_pids(job_uid: str) -> list[int]:
    """Processes of the job's trainer pods: their environment carries JOB_ID."""
    needle = f"JOB_ID={job_uid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def verified_checkpoint(job_status: Status, name: str) -> dict[str, Any] | None:
    status = job_status(name)
    checkpoint = status.get("checkpoint") or {}
    return status if checkpoint.get("verified") and status.get("phase") == "Training" else None


def finished(job_status: Status, name: str) -> dict[str, Any] | None:
    status = job_status(name)
    return status if status.get("phase") in ("Succeeded", "Failed") else None


def test_killed_trainer_resumes_from_last_verified_checkpoint(
    launch_tiny: Any, job_status: Status, pod_logs: Callable[..., str], core: client.CoreV1Api, namespace: str
) -> None:
    uid = launch_tiny("crashy", **LONGER)["metadata"]["uid"]
    before = wait_for(
        lambda: verified_checkpoint(job_status, "crashy"),
        300,
        "a verified checkpoint",
        interval=1,
        describe=pod_logs,
    )
    saved_step = int(before["checkpoint"]["step"])
    pids = trainer_pids(uid)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # what an OOM kill or a node crash looks like

    status = wait_for(
        lambda: finished(job_status, "crashy"), 600, "the job to finish", interval=2, describe=pod_logs
    )
    assert status["phase"] == "Succeeded", pod_logs()
    assert status["restarts"] == 1
    resumed = [int(s) for s in re.findall(r"resuming at step (\d+)", pod_logs(tail=None))]
    assert resumed and resumed[-1] >= saved_step
    assert any(e.startswith("TrainerRestarted") for e in events_for(core, namespace, "crashy"))


def test_suspend_checkpoints_and_resume_continues(
    launch_tiny: Any, kube: client.ApiClient, job_status: Status, pod_logs: Callable[..., str], namespace: str
) -> None:
    uid = launch_tiny("pausable", **LONGER)["metadata"]["uid"]
    wait_for(
        lambda: verified_checkpoint(job_status, "pausable"),
        300,
        "a verified checkpoint",
        interval=1,
        describe=pod_logs,
    )
    custom = client.CustomObjectsApi(kube)
    custom.patch_namespaced_custom_object(
        "finetune.dev", "v1alpha1", namespace, "finetunejobs", "pausable", {"spec": {"suspend": True}}
    )
    wait_for(
        lambda: job_status("pausable").get("phase") == "Suspended", 120, "phase Suspended", describe=pod_logs
    )
    wait_for(lambda: not trainer_pids(uid), 120, "the trainer to stop", describe=pod_logs)
    assert "SIGTERM" in pod_logs(tail=None)
    checkpoint_step = int((job_status("pausable").get("checkpoint") or {}).get("step") or 0)
    assert checkpoint_step > 0

    custom.patch_namespaced_custom_object(
        "finetune.dev", "v1alpha1", namespace, "finetunejobs", "pausable", {"spec": {"suspend": False}}
    )
    status = wait_for(
        lambda: finished(job_status, "pausable"), 600, "the job to finish", interval=2, describe=pod_logs
    )
    assert status["phase"] == "Succeeded", pod_logs()
    resumed = [int(s) for s in re.findall(r"resuming at step (\d+)", pod_logs(tail=None))]
    assert resumed and resumed[-1] >= checkpoint_step


def test_deleting_a_running_job_stops_everything(
    launch_tiny: Any,
    kube: client.ApiClient,
    core: client.CoreV1Api,
    job_status: Status,
    pod_logs: Callable[..., str],
    namespace: str,
) -> None:
    uid = launch_tiny("doomed", **LONGER)["metadata"]["uid"]
    wait_for(
        lambda: job_status("doomed").get("phase") == "Training", 300, "training to start", describe=pod_logs
    )
    assert trainer_pids(uid)
    client.CustomObjectsApi(kube).delete_namespaced_custom_object(
        "finetune.dev", "v1alpha1", namespace, "finetunejobs", "doomed"
    )
    batch = client.BatchV1Api(kube)

    def all_gone() -> bool:
        children = batch.list_namespaced_job(namespace).items + core.list_namespaced_pod(namespace).items
        owned = [
            c
            for c in core.list_namespaced_config_map(namespace).items
            if c.metadata.name.startswith("doomed")
        ]
        return not children and not owned and not trainer_pids(uid)

    wait_for(all_gone, 180, "children and the trainer process to be gone")


def test_missed_success_criteria_fail_the_job_with_the_reason(
    launch_tiny: Any, job_status: Status, pod_logs: Callable[..., str]
) -> None:
    # Two steps teach the model nothing, so exact match cannot improve by 0.3.
    launch_tiny("undertrained", hyperparameters={"maxSteps": 2})
    status = wait_for(
        lambda: finished(job_status, "undertrained"), 600, "the job to finish", interval=2, describe=pod_logs
    )
    assert status["phase"] == "Failed"
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["status"] == "False"
    assert complete["reason"] == "SuccessCriteriaNotMet"
    assert "exact_match" in complete["message"]
    assert status["restarts"] == 0, "a failed success criterion must not be retried"


def condition_of(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def test_rotated_secret_restarts_training_without_losing_work(
    launch_tiny: Any,
    kube: client.ApiClient,
    core: client.CoreV1Api,
    job_status: Status,
    pod_logs: Callable[..., str],
    namespace: str,
) -> None:
    """A deleted Secret is reported and the run goes on; created again with a new value, it is a
    rotation (checkpoint, restart); once the job has succeeded, its Secrets no longer matter."""
    uid = launch_tiny("rotating", **LONGER)["metadata"]["uid"]
    before = wait_for(
        lambda: verified_checkpoint(job_status, "rotating"), 300, "a verified checkpoint", interval=1,
        describe=pod_logs,
    )  # fmt: skip
    first_pids = set(trainer_pids(uid))
    secret = core.read_namespaced_secret("persistence", namespace)
    core.delete_namespaced_secret("persistence", namespace)

    def secret_missing() -> dict[str, Any] | None:
        cond = condition_of(job_status("rotating"), "SecretsReady")
        return cond if cond and cond["status"] == "False" else None

    missing = wait_for(secret_missing, 45, "SecretsReady=False", interval=1, describe=pod_logs)
    assert "persistence" in missing["message"], missing
    assert first_pids <= set(trainer_pids(uid)), "a deleted Secret does not stop the running trainer"
    assert not client.BatchV1Api(kube).read_namespaced_job("rotating", namespace).spec.suspend
    assert condition_of(job_status("rotating"), "SecretsRotated") is None
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "persistence"},
            "data": {**secret.data, "serviceRoleKey": "cm90YXRlZC12YWx1ZQ=="},
        },
    )  # "rotated-value"

    def rotated() -> dict[str, Any] | None:
        status = job_status("rotating")
        cond = next((c for c in status.get("conditions") or [] if c["type"] == "SecretsRotated"), None)
        return status if cond and cond["reason"] == "Restarted" else None

    wait_for(rotated, 180, "the trainer to restart with the rotated Secret", interval=1, describe=pod_logs)
    status = wait_for(lambda: finished(job_status, "rotating"), 600, "the job to finish", interval=2,
                      describe=pod_logs)  # fmt: skip
    assert status["phase"] == "Succeeded", pod_logs()
    assert not first_pids & set(trainer_pids(uid)), "the old trainer process must be gone"
    resumed = [int(s) for s in re.findall(r"resuming at step (\d+)", pod_logs(tail=None))]
    assert resumed and resumed[-1] >= int(before["checkpoint"]["step"])
    assert any(e.startswith("SecretRotated") for e in events_for(core, namespace, "rotating"))
    assert "rotated-value" not in json.dumps(status) + " ".join(events_for(core, namespace, "rotating"))

    # Finished stays finished: no preflight again, even without its Secret and with an edited spec.
    core.delete_namespaced_secret("persistence", namespace)
    client.CustomObjectsApi(kube).patch_namespaced_custom_object(
        "finetune.dev", "v1alpha1", namespace, "finetunejobs", "rotating", {"spec": {"backoffLimit": 5}}
    )

    def edit_handled() -> dict[str, Any] | None:
        status = job_status("rotating")
        cond = condition_of(status, "SpecApplied")
        return status if cond and cond["status"] == "False" else None

    status = wait_for(edit_handled, 30, "the edit of a finished job to be handled", interval=1)
    assert status["phase"] == "Succeeded", status
    assert condition_of(status, "SecretsReady")["status"] == "True"  # type: ignore[index]
    assert "spec.backoffLimit" in condition_of(status, "SpecApplied")["message"]  # type: ignore[index]

    # Its Job deleted too (by hand, or a cleanup policy): still finished, never launched again.
    batch = client.BatchV1Api(kube)
    batch.delete_namespaced_job("rotating", namespace, propagation_policy="Background")
    wait_for(lambda: not batch.list_namespaced_job(namespace).items, 60, "the Job to be gone")
    edited = client.CustomObjectsApi(kube).patch_namespaced_custom_object(
        "finetune.dev", "v1alpha1", namespace, "finetunejobs", "rotating", {"spec": {"backoffLimit": 6}}
    )
    generation = edited["metadata"]["generation"]
    status = wait_for(
        lambda: (s := job_status("rotating")).get("observedGeneration") == generation and s,
        30,
        "the edit to be handled",
    )
    assert status["phase"] == "Succeeded" and not batch.list_namespaced_job(namespace).items


def test_suspend_while_preparing_data_stops_the_pod_within_seconds(
    launch_tiny: Any,
    cluster: ClusterInfo,
    kube: client.ApiClient,
    job_status: Status,
    pod_logs: Callable[..., str],
    namespace: str,
    tmp_path: Path,
) -> None:
    key = f"data/{namespace}/distinct.jsonl"  # cleaning 100,000 of them takes minutes
    data = write_jsonl(distinct_records(100_000), tmp_path / "distinct.jsonl")
    s3_client(cluster).upload_file(str(data), BUCKET, key)
    uid = launch_tiny("early", dataset={"source": f"s3://{BUCKET}/{key}"})["metadata"]["uid"]
    wait_for(
        lambda: "cleaning 100000 records from dataset.source" in pod_logs(tail=None),
        300,
        "the trainer to clean the data",
        describe=pod_logs,
    )
    assert job_status("early")["phase"] == "Preparing"
    client.CustomObjectsApi(kube).patch_namespaced_custom_object(
        "finetune.dev", "v1alpha1", namespace, "finetunejobs", "early", {"spec": {"suspend": True}}
    )
    suspended = time.monotonic()
    wait_for(lambda: not trainer_pids(uid), 120, "the trainer to stop", describe=pod_logs)
    # The pod's grace period is 300 s: a trainer that ignored SIGTERM would run that long.
    assert time.monotonic() - suspended < STOPS_WITHIN_S, pod_logs()
    assert "SIGTERM received outside training: stopping now" in pod_logs(tail=None)
    status = wait_for(
        lambda: job_status("early").get("phase") == "Suspended" and job_status("early"),
        60,
        "phase Suspended",
        describe=pod_logs,
    )
    assert status["restarts"] == 0, "a suspend is not a crash"


def test_a_diverging_run_fails_for_good_naming_the_step(
    launch_tiny: Any,
    core: client.CoreV1Api,
    job_status: Status,
    pod_logs: Callable[..., str],
    namespace: str,
) -> None:
    faults = REPO_ROOT / ".run" / "faults" / namespace  # inside the tree the trainer pod sees
    faults.mkdir(parents=True, exist_ok=True)
    (faults / "sitecustomize.py").write_text(
        f"from finetune_trainer.testing.faults import inject\ninject('loss', {NAN_STEP})\n"
    )
    launch_tiny(
        "diverging",
        env=[{"name": "PYTHONPATH", "value": str(faults)}],
        checkpoints={"everySteps": NAN_STEP // 2},
    )
    status = wait_for(
        lambda: finished(job_status, "diverging"), 600, "the job to finish", interval=2, describe=pod_logs
    )
    assert status["phase"] == "Failed", pod_logs()
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["reason"] == "TrainingDiverged", complete
    assert f"training diverged at step {NAN_STEP}: loss nan" in complete["message"], complete
    assert status["restarts"] == 0, "a diverged run must not be retried"
    assert len(core.list_namespaced_pod(namespace, label_selector="job-name").items) == 1
    assert int(status["checkpoint"]["step"]) == NAN_STEP // 2, status["checkpoint"]


def test_a_store_that_refuses_the_credentials_fails_at_once_naming_the_secret(
    launch_tiny: Any,
    core: client.CoreV1Api,
    cluster: ClusterInfo,
    job_status: Status,
    pod_logs: Callable[..., str],
    namespace: str,
) -> None:
    """A wrong secret key is not retried (no pod attempts spent on what no retry fixes), and the
    status says which store, which Secret and what to do, never the key itself."""
    wrong = "wrong-" + cluster.s3_secret_key[::-1]
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-wrong"},
            "stringData": {"accessKeyId": cluster.s3_access_key, "secretAccessKey": wrong},
        },
    )
    launch_tiny("refused", checkpoints={"store": {"credentialsSecret": "s3-wrong"}}, backoffLimit=3)
    status = wait_for(
        lambda: finished(job_status, "refused"), 180, "the job to fail", interval=1, describe=pod_logs
    )
    assert status["phase"] == "Failed", status
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["reason"] == "StoreRefused", complete
    message = complete["message"]
    assert f"dataset.source: reading s3://{BUCKET}/" in message and cluster.s3_endpoint in message, message
    assert "SignatureDoesNotMatch" in message and "Secret 's3-wrong'" in message, message
    assert status["restarts"] == 0
    assert len(core.list_namespaced_pod(namespace, label_selector="job-name").items) == 1, "not retried"
    assert wrong not in json.dumps(status) + pod_logs(tail=None)
