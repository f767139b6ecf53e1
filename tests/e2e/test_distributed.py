"""Full fine-tuning with DeepSpeed ZeRO-2 and ZeRO-3 across two pods, and QLoRA, through the operator."""

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


def run_to_the_end(
    name: str, job_status: Status, pod_logs: Callable[[], str], timeout: float = 420
) -> dict[str, Any]:
    status = wait_for(
        lambda: finished(job_status, name), timeout, f"{name} to finish", interval=2, describe=pod_logs
    )
    assert status["phase"] == "Succeeded", (status, pod_logs())
    return status


def all_exited(core: client.CoreV1Api, namespace: str) -> list[Any] | None:
    pods = sorted(core.list_namespaced_pod(namespace).items, key=lambda p: p.metadata.name)
    return pods if pods and all(p.status.phase in ("Succeeded", "Failed") for p in pods) else None


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_full_fine_tune_across_two_pods(
    stage: int,
    launch_tiny: Any,
    job_status: Status,
    pod_logs: Callable[[], str],
    core: client.CoreV1Api,
    cluster: ClusterInfo,
    namespace: str,
) -> None:
    name = f"ds-zero{stage}"
    obj = launch_tiny(
        name,
        method={"type": "full", "deepspeed": {"stage": stage}, "allowSmallDataFullFineTune": True},
        resources={"nodes": 2, "gpusPerNode": 1},
        **SHORT,
    )
    status = run_to_the_end(name, job_status, pod_logs)
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

    # One uploader: a verified checkpoint (ZeRO-3's gathered into whole weights, which the restore
    # check loads) and one final artifact with full weights.
    assert status["checkpoint"]["verified"] is True
    prefix = f"checkpoints/{namespace}/{name}/{obj['metadata']['uid']}/"
    keys = [o["Key"] for o in s3_client(cluster).list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    assert [k for k in keys if "/checkpoints/" in k and k.endswith("/VERIFIED")], keys
    assert [k for k in keys if "/final/" in k and k.endswith("model.safetensors")], keys
    assert sum("rank 0 saves and reports" in text for text in logs) == 1


def test_qlora_job_succeeds(launch: Any, job_status: Status, pod_logs: Callable[[], str]) -> None:
    """The quickstart's task and success criteria on a 4-bit base (bitsandbytes' CPU backend here):
    the adapter learns the Unicode names on top of quantized SmolLM2 weights."""
    launch(
        "qlora",
        method={"type": "qlora", "quantization": {"bits": 4, "quantType": "nf4", "doubleQuant": True}},
        checkpoints={"everySteps": 20},
    )
    status = run_to_the_end("qlora", job_status, pod_logs, timeout=900)
    assert status["method"]["type"] == "qlora"
    assert status["final"]["eval_loss"] < status["baseline"]["eval_loss"] - 2.0, status
    assert status["final"]["exact_match"] > status["baseline"]["exact_match"], status
    assert status["final"]["token_f1"] > status["baseline"]["token_f1"] + 0.3, status
    assert status["checkpoint"]["verified"] is True
    print(f"qlora: baseline {status['baseline']} final {status['final']}")


def rank_pid(job_uid: str, rank: int, variable: str = "NODE_RANK") -> int | None:
    """The trainer process of one pod of the job (or, by RANK, one rank of a pod with several): its
    environment carries JOB_ID and the rank, and it is a Python process (the image's init, tini,
    carries the same environment)."""
    wanted = {f"JOB_ID={job_uid}".encode(), f"{variable}={rank}".encode()}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or not wanted <= set((entry / "environ").read_bytes().split(b"\0")):
                continue
            if Path((entry / "cmdline").read_bytes().split(b"\0")[0].decode()).name.startswith("python"):
                return int(entry.name)
        except OSError:
            continue
    return None


def verified_mid_run(job_status: Status, name: str) -> dict[str, Any] | None:
    status = job_status(name)
    checkpoint = status.get("checkpoint") or {}
    return status if checkpoint.get("verified") and status.get("phase") == "Training" else None


def committed_manifests(cluster: ClusterInfo, prefix: str) -> list[dict[str, Any]]:
    s3 = s3_client(cluster)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]
    found = [k for k in keys if re.search(r"/step-\d+/MANIFEST\.json$", k)]
    return [json.loads(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()) for k in found]


def launch_zero2_pair(launch_tiny: Any, name: str, steps: int, gpus_per_node: int = 1) -> Any:
    """A two-pod ZeRO-2 job of exactly `steps` optimizer steps, checkpointing often."""
    return launch_tiny(
        name,
        method={"type": "full", "deepspeed": {"stage": 2}, "allowSmallDataFullFineTune": True},
        resources={"nodes": 2, "gpusPerNode": gpus_per_node},
        hyperparameters={"epochs": 1, "maxSteps": steps, "learningRate": 0.003},
        checkpoints=SHORT["checkpoints"],
        goal=SHORT["goal"],
    )


def test_one_pod_with_two_gpus_trains_lora_on_both(
    launch_tiny: Any, job_status: Status, pod_logs: Callable[..., str]
) -> None:
    """LoRA data-parallel through the operator: two processes in one pod, one per GPU (ZeRO in
    one pod is covered by the trainer's own tests; ZeRO across pods above)."""
    launch_tiny("lora-one-pod", method={"type": "lora"}, resources={"nodes": 1, "gpusPerNode": 2}, **SHORT)
    status = run_to_the_end("lora-one-pod", job_status, pod_logs)
    assert status["ranks"] == {"worldSize": 2, "perPod": 2, "pods": 1}, status
    logs = pod_logs(tail=None)
    assert "launching 2 trainer processes in this pod: ranks 0-1 of world size 2 (1 pods)" in logs
    assert sorted(JOINED.findall(logs)) == [("0", "2", "gloo"), ("1", "2", "gloo")]
    assert status["final"]["eval_loss"] < status["baseline"]["eval_loss"]


def test_killed_rank_of_a_two_pod_job_resumes_every_rank_from_its_checkpoint(
    launch_tiny: Any,
    job_status: Status,
    pod_logs: Callable[..., str],
    core: client.CoreV1Api,
    cluster: ClusterInfo,
    namespace: str,
) -> None:
    """Two pods with two GPUs each: four ranks. One rank's process is killed; all four resume."""
    started = time.monotonic()
    # Long enough that an idle machine does not finish before a verified checkpoint is seen mid-run.
    steps = 200
    obj = launch_zero2_pair(launch_tiny, "ds-kill", steps, gpus_per_node=2)
    uid = obj["metadata"]["uid"]
    before = wait_for(
        lambda: verified_mid_run(job_status, "ds-kill"), 300, "a verified checkpoint", describe=pod_logs
    )
    assert before["ranks"] == {"worldSize": 4, "perPod": 2, "pods": 2}, before
    pid = rank_pid(uid, 3, variable="RANK")
    assert pid is not None, pod_logs()
    os.kill(pid, signal.SIGKILL)  # one GPU's process in the second pod: an OOM kill
    # Its pod's launcher stops the pod's other rank; rank 0 notices that its peers are gone and
    # ends instead of waiting on a collective for minutes, so the Job brings every rank back.
    wait_for(
        lambda: len(re.findall("resuming at step", pod_logs(tail=None))) == 4,
        300,
        "all four ranks of the retry to resume",
        describe=pod_logs,
    )

    status = run_to_the_end("ds-kill", job_status, pod_logs)
    assert status["restarts"] >= 1, status
    logs = pod_logs(tail=None)
    assert "rank process 1 ended with code -9: stopping the others" in logs
    # All ranks of the retry resumed from the same checkpoint, at or after the verified one.
    resumed = [int(s) for s in re.findall(r"resuming at step (\d+)", logs)]
    assert len(resumed) == 4 and len(set(resumed)) == 1, resumed
    assert resumed[0] >= int(before["checkpoint"]["step"]), resumed
    for rank in (1, 2, 3):
        assert f"rank {rank} resumes from checkpoint-{resumed[0]}" in logs
    # Every configured step ran once in all: the resumed run trained on to exactly `steps`.
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == steps
    assert (
        status["checkpoint"]["verified"] is True
        and status["final"]["eval_loss"] < status["baseline"]["eval_loss"]
    )

    # Every committed checkpoint lists all four ranks' optimizer partitions and RNG states.
    manifests = committed_manifests(cluster, f"checkpoints/{namespace}/ds-kill/{uid}/checkpoints/")
    assert manifests and max(m["step"] for m in manifests) == steps
    for manifest in manifests:
        paths = {f["path"] for f in manifest["files"]}
        assert manifest["world_size"] == 4
        for rank in range(4):
            assert any(re.search(rf"zero_pp_rank_{rank}_mp_rank_00_optim_states\.pt$", p) for p in paths)
            assert f"rng_state_{rank}.pth" in paths
    print(f"two-pod, four-rank kill and resume: {time.monotonic() - started:.0f}s")


def test_suspended_two_pod_job_commits_every_ranks_part_and_resumes(
    launch_tiny: Any,
    kube: client.ApiClient,
    job_status: Status,
    pod_logs: Callable[..., str],
    cluster: ClusterInfo,
    namespace: str,
) -> None:
    started = time.monotonic()
    steps = 200
    uid = launch_zero2_pair(launch_tiny, "ds-pause", steps)["metadata"]["uid"]
    wait_for(
        lambda: verified_mid_run(job_status, "ds-pause"), 300, "a verified checkpoint", describe=pod_logs
    )
    custom = client.CustomObjectsApi(kube)
    patch = {"spec": {"suspend": True}}
    custom.patch_namespaced_custom_object(
        "finetune.dev", "v1alpha1", namespace, "finetunejobs", "ds-pause", patch
    )
    wait_for(
        lambda: rank_pid(uid, 0) is None and rank_pid(uid, 1) is None,
        180,
        "both trainers to stop",
        describe=pod_logs,
    )

    # SIGTERM reached both pods; each stored its part and rank 0 committed the checkpoint.
    stopped = re.findall(
        r"rank (\d) stops after SIGTERM: the checkpoint of step (\d+) is stored", pod_logs(tail=None)
    )
    assert sorted(rank for rank, _ in stopped) == ["0", "1"] and stopped[0][1] == stopped[1][1], stopped
    step = int(stopped[0][1])
    manifests = committed_manifests(cluster, f"checkpoints/{namespace}/ds-pause/{uid}/checkpoints/")
    [saved] = [m for m in manifests if m["step"] == step]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {f["path"] for f in saved["files"]}

    patch = {"spec": {"suspend": False}}
    custom.patch_namespaced_custom_object(
        "finetune.dev", "v1alpha1", namespace, "finetunejobs", "ds-pause", patch
    )
    status = run_to_the_end("ds-pause", job_status, pod_logs)
    resumed = [int(s) for s in re.findall(r"resuming at step (\d+)", pod_logs(tail=None))]
    assert resumed == [step, step], resumed
    assert status["progress"]["step"] == steps
    print(f"two-pod suspend and resume: {time.monotonic() - started:.0f}s")
