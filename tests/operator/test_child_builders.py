"""The children of a FineTuneJob, as built (no cluster): names, ownership, the trainer config,
least-privilege RBAC, the Job's retry policy, security context, resources and environment."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from finetune_operator import api, builders, policy
from finetune_operator.builders import JobRef
from finetune_operator.settings import OperatorSettings
from finetune_operator.status import EXIT_CODE_MEANINGS
from finetune_trainer.config import parse_config
from finetune_trainer.distributed import rendezvous_from_env
from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.launcher import plan_from_env, rank_env

Spec = dict[str, Any]
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def children_for(
    spec: Spec,
    settings: OperatorSettings,
    job: JobRef,
    *,
    is_cloud: bool = False,
    versions: dict[str, str] | None = None,
) -> dict[str, Any]:
    parsed = api.parse_spec(spec)
    decision = policy.resolve_method(parsed, settings)
    built = builders.build_children(
        job, parsed, decision, settings, is_cloud=is_cloud, secret_versions=versions
    )
    return {f"{c['kind']}/{c['metadata']['name']}": c for c in built}


def the(children: dict[str, Any], kind: str) -> dict[str, Any]:
    (match,) = [c for key, c in children.items() if key.startswith(f"{kind}/")]
    return match  # type: ignore[no-any-return]


def pod_spec(children: dict[str, Any]) -> dict[str, Any]:
    return the(children, "Job")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def env_of(children: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in pod_spec(children)["containers"][0]["env"]}


# ---------------------------------------------------------------------------------------------
# Names and ownership


@pytest.mark.parametrize(
    ("name", "suffix", "expected"),
    [
        ("support-bot", "config", "support-bot-config"),
        ("Support.Bot", "", "support-bot"),
        ("7b-tune", "trainer", "ftj-7b-tune-trainer"),
    ],
)
def test_short_names_are_readable(name: str, suffix: str, expected: str) -> None:
    assert builders.dns_label(name, suffix) == expected


def test_long_names_are_truncated_with_a_hash_and_stay_unique() -> None:
    first = "a" * 80 + "-first"
    second = "a" * 80 + "-second"
    names = [builders.dns_label(n, "progress") for n in (first, second)]
    assert all(len(n) <= 63 and DNS_1035.match(n) and n.endswith("-progress") for n in names)
    assert names[0] != names[1]
    assert builders.dns_label(first, "progress") == names[0]  # deterministic


def test_job_name_leaves_room_for_the_pod_index() -> None:
    names = builders.child_names("x" * 200)
    assert len(f"{names.job}-63") <= 63
    assert all(len(n) <= 63 and DNS_1035.match(n) for n in vars(names).values())


def test_children_in_creation_order_all_owned_by_the_job(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef
) -> None:
    children = children_for(spec_dict(), settings, job_ref)
    assert list(children) == [
        "ServiceAccount/support-bot-trainer",
        "Role/support-bot-trainer",
        "RoleBinding/support-bot-trainer",
        "ConfigMap/support-bot-progress",
        "ConfigMap/support-bot-config",
        "NetworkPolicy/support-bot-trainer",
        "Job/support-bot",
    ]
    for child in children.values():
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "name": "support-bot",
                "uid": "0f3c-uid",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"][builders.JOB_UID_LABEL] == "0f3c-uid"


def test_job_ref_from_metadata() -> None:
    meta = {"name": "a", "namespace": "b", "uid": "c", "generation": 2}
    assert JobRef.from_metadata(meta) == JobRef("a", "b", "c")


# ---------------------------------------------------------------------------------------------
# RBAC


def test_trainer_may_only_get_and_patch_its_progress_config_map(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef
) -> None:
    children = children_for(spec_dict(), settings, job_ref)
    assert the(children, "Role")["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["support-bot-progress"],
            "verbs": ["get", "patch"],
        }
    ]
    binding = the(children, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "support-bot-trainer",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "support-bot-trainer", "namespace": "team-a"}
    ]
    assert the(children, "ServiceAccount")["automountServiceAccountToken"] is False
    pod = pod_spec(children)
    assert pod["serviceAccountName"] == "support-bot-trainer"
    assert pod["automountServiceAccountToken"] is True
    assert children["ConfigMap/support-bot-progress"]["data"] == {}


# ---------------------------------------------------------------------------------------------
# Trainer config


def test_config_map_holds_a_trainer_config_the_trainer_accepts(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef
) -> None:
    spec = spec_dict(
        environment="cloud",
        dataset={"source": "hf://datasets/acme/tickets", "expectedExamples": 20000},
        goal={"heldOutTest": False, "testFile": "file:///data/test.jsonl"},
        env=[{"name": "HF_TOKEN", "secretKeyRef": {"name": "hub", "key": "token"}}],
        resumeFrom="latest",
    )
    children = children_for(spec, settings, job_ref, is_cloud=True)
    config = parse_config(json.loads(children["ConfigMap/support-bot-config"]["data"]["config.json"]))
    assert (config.job.name, config.job.namespace, config.job.uid) == ("support-bot", "team-a", "0f3c-uid")
    assert (
        config.method.type == "full"
        and config.method.deepspeed.enabled
        and config.method.deepspeed.stage == 2
    )
    assert "20,000 examples" in config.method.reason
    assert config.environment.is_cloud is True
    assert config.dataset.source == "acme/tickets"
    assert config.dataset.test_source == "/data/test.jsonl"
    assert config.report.config_map == "support-bot-progress"
    assert config.checkpoints.resume_from == "latest" and config.checkpoints.store.bucket == "ckpt"
    assert config.required_env == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"]
    assert [c.metric for c in config.goal.success_criteria] == ["eval_loss"]
    assert config.metrics_port == settings.trainer_metrics_port


@pytest.mark.parametrize(("interval", "linger"), [(15.0, 16.0), (2.0, 3.0), (0.0, 0.0)])
def test_trainers_keep_metrics_up_one_scrape_interval_after_the_run(
    spec_dict: Callable[..., Spec], job_ref: JobRef, interval: float, linger: float
) -> None:
    settings = OperatorSettings(trainer_scrape_interval=interval)
    children = children_for(spec_dict(), settings, job_ref, is_cloud=False)
    config = parse_config(json.loads(children["ConfigMap/support-bot-config"]["data"]["config.json"]))
    assert config.metrics_linger_seconds == linger


def test_lora_settings_and_qlora_quantization_reach_the_trainer(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef
) -> None:
    spec = spec_dict(
        method={
            "type": "qlora",
            "lora": {"r": 8, "targetModules": ["q_proj", "v_proj"]},
            "quantization": {"computeDtype": "float16"},
        }
    )
    config = parse_config(
        json.loads(
            children_for(spec, settings, job_ref)["ConfigMap/support-bot-config"]["data"]["config.json"]
        )
    )
    assert config.method.type == "qlora" and not config.method.deepspeed.enabled
    assert (config.method.lora.r, config.method.lora.target_modules) == (8, ["q_proj", "v_proj"])
    assert config.method.quantization.compute_dtype == "float16"


@pytest.mark.parametrize(
    ("changes", "is_cloud", "merged"),
    [
        ({"method": {"type": "qlora", "quantization": {}}, "output": {"mergeAdapter": True}}, False, True),
        ({"method": {"type": "lora"}, "output": {"mergeAdapter": True}}, False, True),
        ({"method": {"type": "lora"}}, False, False),
        # auto picks full here: its artifact is the whole model already, there is nothing to merge
        ({"dataset": {"expectedExamples": 20000}, "output": {"mergeAdapter": True}}, True, False),
    ],
    ids=["qlora-merge", "lora-merge", "lora-default", "auto-resolved-to-full"],
)
def test_merge_request_reaches_the_trainer_only_for_adapters(
    spec_dict: Callable[..., Spec],
    settings: OperatorSettings,
    job_ref: JobRef,
    changes: Spec,
    is_cloud: bool,
    merged: bool,
) -> None:
    spec = spec_dict(**changes, environment="cloud" if is_cloud else "onprem")
    children = children_for(spec, settings, job_ref, is_cloud=is_cloud)
    config = parse_config(json.loads(children["ConfigMap/support-bot-config"]["data"]["config.json"]))
    assert config.output.merge_adapter is merged
    assert (config.method.type == "full") is ("expectedExamples" in json.dumps(changes))


def test_config_and_secret_hashes_change_when_their_inputs_change(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef
) -> None:
    def annotations(spec: Spec, versions: dict[str, str]) -> dict[str, str]:
        job = the(children_for(spec, settings, job_ref, versions=versions), "Job")
        return job["spec"]["template"]["metadata"]["annotations"]  # type: ignore[no-any-return]

    base = annotations(spec_dict(), {"s3-creds": "100"})
    assert annotations(spec_dict(), {"s3-creds": "100"}) == base
    rotated = annotations(spec_dict(), {"s3-creds": "101"})
    assert rotated[builders.SECRETS_HASH_ANNOTATION] != base[builders.SECRETS_HASH_ANNOTATION]
    assert rotated[builders.CONFIG_HASH_ANNOTATION] == base[builders.CONFIG_HASH_ANNOTATION]
    retuned = annotations(spec_dict(hyperparameters={"epochs": 1}), {"s3-creds": "100"})
    assert retuned[builders.CONFIG_HASH_ANNOTATION] != base[builders.CONFIG_HASH_ANNOTATION]


# ---------------------------------------------------------------------------------------------
# The Job


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {},
            {
                "completionMode": "NonIndexed",
                "completions": 1,
                "parallelism": 1,
                "backoffLimit": 3,
                "suspend": False,
            },
        ),
        (
            {"method": {"type": "full"}, "resources": {"nodes": 3}, "backoffLimit": 6, "suspend": True},
            {
                "completionMode": "Indexed",
                "completions": 3,
                "parallelism": 3,
                "backoffLimit": 18,  # 6 retries of all 3 pods: a lost pod fails its peers too
                "suspend": True,
            },
        ),
        ({"activeDeadlineSeconds": 86400}, {"activeDeadlineSeconds": 86400}),
    ],
)
def test_job_shape_follows_the_spec(
    spec_dict: Callable[..., Spec],
    settings: OperatorSettings,
    job_ref: JobRef,
    changes: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    job_spec = the(children_for(spec_dict(**changes), settings, job_ref), "Job")["spec"]
    assert {k: job_spec.get(k) for k in expected} == expected


def test_pod_failure_policy_fails_fast_resumes_after_preemption(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef
) -> None:
    job_spec = the(children_for(spec_dict(), settings, job_ref), "Job")["spec"]
    rules = job_spec["podFailurePolicy"]["rules"]
    by_action: dict[str, list[int]] = {}
    for rule in rules:
        if "onExitCodes" in rule:
            assert (
                rule["onExitCodes"]["containerName"] == "trainer" and rule["onExitCodes"]["operator"] == "In"
            )
            by_action.setdefault(rule["action"], []).extend(rule["onExitCodes"]["values"])
    assert sorted(by_action["FailJob"]) == sorted(
        [
            ExitCode.INVALID_CONFIG,
            ExitCode.SUCCESS_CRITERIA_NOT_MET,
            ExitCode.DATA_REFUSED,
            ExitCode.CHECKPOINT_RESTORE_FAILED,
            ExitCode.DIVERGED,
            ExitCode.STORE_REFUSED,
        ]
    )
    assert by_action["Ignore"] == [ExitCode.PREEMPTED_CHECKPOINTED, ExitCode.PREEMPTED_OUTSIDE_TRAINING]
    for code in by_action["FailJob"] + by_action["Ignore"]:  # the status explains each of them
        assert code in EXIT_CODE_MEANINGS, code
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert job_spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy


def test_restricted_security_context(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef
) -> None:
    pod = pod_spec(children_for(spec_dict(), settings, job_ref))
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/finetune"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    for writable in ("/tmp", "/workspace", "/cache", "/dev/shm"):
        assert "emptyDir" in volumes[mounts[writable]["name"]], writable
    assert volumes["config"]["configMap"]["name"] == "support-bot-config"


def test_trainer_container_runs_the_contract(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef
) -> None:
    pod = pod_spec(children_for(spec_dict(terminationGracePeriodSeconds=900), settings, job_ref))
    container = pod["containers"][0]
    # No command: the image's ENTRYPOINT (tini, then `python -m finetune_trainer`) receives the args.
    assert "command" not in container
    assert container["args"] == ["--config", "/etc/finetune/config.json"]
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container["ports"]
    assert container["image"] == settings.trainer_image
    assert pod["terminationGracePeriodSeconds"] == 900


@pytest.mark.parametrize(
    ("resources", "requests", "limits"),
    [
        # 0.5B LoRA on one GPU: 2 CPUs, 3 GiB runtime + 1 GiB 16-bit weights while loading, the
        # model and three local checkpoints on disk; a request, no memory limit.
        (
            {},
            {"nvidia.com/gpu": "1", "cpu": "2", "memory": "4Gi", "ephemeral-storage": "7Gi"},
            {"nvidia.com/gpu": "1"},
        ),
        # Per process: 8 GPUs, 8 processes, each loading its own copy.
        (
            {"gpusPerNode": 8},
            {"nvidia.com/gpu": "8", "cpu": "16", "memory": "32Gi", "ephemeral-storage": "9Gi"},
            {"nvidia.com/gpu": "8"},
        ),
        (
            {"gpusPerNode": 8, "cpu": "32", "memory": "512Gi", "ephemeralStorage": "1Ti"},
            {"nvidia.com/gpu": "8", "cpu": "32", "memory": "512Gi", "ephemeral-storage": "1Ti"},
            {"nvidia.com/gpu": "8", "memory": "512Gi"},
        ),
        ({"gpusPerNode": 0, "cpu": "2"}, {"cpu": "2", "memory": "7Gi", "ephemeral-storage": "7Gi"}, None),
    ],
)
def test_resources(
    spec_dict: Callable[..., Spec],
    settings: OperatorSettings,
    job_ref: JobRef,
    resources: dict[str, Any],
    requests: dict[str, str],
    limits: dict[str, str] | None,
) -> None:
    container = pod_spec(children_for(spec_dict(resources=resources), settings, job_ref))["containers"][0]
    assert container["resources"].get("requests") == requests
    assert container["resources"].get("limits") == limits


def test_placement_is_copied(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef
) -> None:
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    pod = pod_spec(
        children_for(
            spec_dict(resources={"nodeSelector": {"pool": "a100"}, "tolerations": tolerations}),
            settings,
            job_ref,
        )
    )
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["tolerations"] == tolerations


# ---------------------------------------------------------------------------------------------
# Environment


def test_environment_contract(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef
) -> None:
    spec = spec_dict(
        userId="alice",
        checkpoints={
            "store": {
                "bucket": "ckpt",
                "credentialsSecret": "s3-creds",
                "accessKeyIdKey": "id",
                "secretAccessKeyKey": "secret",
            }
        },
        env=[
            {"name": "OPENAI_API_KEY", "secretKeyRef": {"name": "llm", "key": "key"}},
            {"name": "LOG_LEVEL", "value": "debug"},
        ],
    )
    env = env_of(children_for(spec, settings, job_ref, is_cloud=True))
    values = {name: e.get("value") for name, e in env.items()}
    assert (
        values["JOB_ID"] == "0f3c-uid"
        and values["JOB_NAME"] == "support-bot"
        and values["JOB_NAMESPACE"] == "team-a"
    )
    assert values["IS_CLOUD"] == "true" and values["USER_ID"] == "alice"
    assert values["FINETUNE_CONFIG"] == "/etc/finetune/config.json" and values["METRICS_PORT"] == "9400"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": "id"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "secret"}
    }
    assert env["OPENAI_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "llm", "key": "key"}}
    assert values["LOG_LEVEL"] == "debug"
    assert not {"MASTER_ADDR", "NODE_RANK"} & env.keys()
    for name, entry in env.items():
        if re.search("KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", name):
            assert "value" not in entry, f"{name} carries a literal value"


def test_on_prem_and_anonymous_job(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef
) -> None:
    env = env_of(
        children_for(
            spec_dict(checkpoints={"store": {"bucket": "ckpt", "credentialsSecret": None}}), settings, job_ref
        )
    )
    assert env["IS_CLOUD"]["value"] == "false"
    assert "USER_ID" not in env and "AWS_ACCESS_KEY_ID" not in env


def test_multi_node_rendezvous(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef
) -> None:
    children = children_for(
        spec_dict(method={"type": "full"}, resources={"nodes": 2, "gpusPerNode": 4}), settings, job_ref
    )
    service = children["Service/support-bot-workers"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    pod = pod_spec(children)
    template_labels = the(children, "Job")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()
    assert pod["subdomain"] == "support-bot-workers"
    env = env_of(children)
    assert env["MASTER_ADDR"]["value"] == "support-bot-0.support-bot-workers"
    assert env["MASTER_PORT"]["value"] == "29500"
    assert (env["NNODES"]["value"], env["WORLD_SIZE"]["value"]) == ("2", "8")
    assert env["NODE_RANK"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }


def _pod_env(env: dict[str, dict[str, Any]], pod_ip: str, index: int) -> dict[str, str]:
    """The rendered env as the kubelet resolves it for the pod with completion index `index`."""
    resolved = {"status.podIP": pod_ip}
    out = {}
    for name, entry in env.items():
        if "value" in entry:
            out[name] = entry["value"]
        elif "fieldRef" in entry.get("valueFrom", {}):
            path = entry["valueFrom"]["fieldRef"]["fieldPath"]
            out[name] = resolved.get(path, str(index))
    return out


@pytest.mark.parametrize(
    ("nodes", "gpus", "ranks_of_pod_1", "world"),
    [(1, 1, None, 1), (1, 4, None, 4), (2, 8, list(range(8, 16)), 16)],
)
def test_every_gpu_of_every_pod_gets_a_rank(
    spec_dict: Callable[..., Spec],
    settings: OperatorSettings,
    job_ref: JobRef,
    nodes: int,
    gpus: int,
    ranks_of_pod_1: list[int] | None,
    world: int,
) -> None:
    """What the operator renders, read by the trainer's launcher and each rank it starts."""
    spec = spec_dict(method={"type": "full"}, resources={"nodes": nodes, "gpusPerNode": gpus})
    children = children_for(spec, settings, job_ref)
    container = pod_spec(children)["containers"][0]
    assert container["args"] == ["--config", "/etc/finetune/config.json"] and "command" not in container
    env = env_of(children)
    assert env["NPROC_PER_NODE"]["value"] == str(gpus)
    seen: list[int] = []
    for index in range(nodes):
        pod = _pod_env(env, f"10.0.0.{index + 7}", index)
        plan = plan_from_env(pod)
        if gpus == 1:
            assert plan is None
            assert rendezvous_from_env(pod, cuda_devices=1).world_size == world
            return
        assert plan is not None and plan.world_size == world
        if nodes == 1:
            assert plan.master_addr == "10.0.0.7"  # the pod's own address: pods may share a host
        ranks = [rendezvous_from_env(pod | rank_env(plan, i), cuda_devices=gpus) for i in range(gpus)]
        assert {r.world_size for r in ranks} == {world}
        seen += [r.rank for r in ranks]
        if index == 1:
            assert [r.rank for r in ranks] == ranks_of_pod_1
    assert sorted(seen) == list(range(world))


def test_single_node_has_no_service(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef
) -> None:
    children = children_for(spec_dict(), settings, job_ref)
    assert not any(key.startswith("Service/") for key in children)
    assert "subdomain" not in pod_spec(children)


def _owned(uid: str, controller: bool = True, kind: str = "FineTuneJob") -> dict[str, Any]:
    ref = {"apiVersion": "finetune.dev/v1alpha1", "kind": kind, "name": "bot", "uid": uid}
    return {"metadata": {"ownerReferences": [ref | {"controller": controller}]}}


@pytest.mark.parametrize(
    ("child", "foreign"),
    [
        (None, None),  # nothing there yet
        ({"metadata": {}}, None),  # no owner: not another job's
        (_owned("uid-live"), None),
        (_owned("uid-dead"), "uid-dead"),  # a deleted job's child, or a recreate's predecessor
        (_owned("uid-dead", controller=False), None),  # not controlled by a FineTuneJob
        (_owned("uid-dead", kind="Deployment"), None),
    ],
)
def test_a_child_of_another_job_is_recognised(child: dict[str, Any] | None, foreign: str | None) -> None:
    assert builders.foreign_owner(child, "uid-live") == foreign


def test_children_name_their_controller() -> None:
    ref = builders.JobRef(name="bot", namespace="team-a", uid="uid-live")
    assert builders.controller_uid({"metadata": builders._metadata(ref, "bot")}) == "uid-live"


@pytest.mark.parametrize(
    ("memory", "shm"),
    [(None, "16Gi"), ("64Gi", "16Gi"), ("32Gi", "16Gi"), ("8Gi", "4096Mi"), ("3G", "1430Mi")],
)
def test_shared_memory_fits_in_the_memory_limit(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, job_ref: JobRef, memory: str | None, shm: str
) -> None:
    """/dev/shm is RAM charged to the pod: writes there past its memory limit would kill it."""
    resources = {"memory": memory} if memory else {}
    pod = pod_spec(children_for(spec_dict(resources=resources), settings, job_ref))
    volume = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": shm}


def test_network_policy_admits_the_jobs_own_pods_and_the_scraper(job_ref: JobRef) -> None:
    scraper = {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    settings = OperatorSettings(trainer_metrics_from=[scraper])
    policy_ = builders.build_network_policy(job_ref, settings)
    assert policy_ is not None and policy_["kind"] == "NetworkPolicy"
    own = {"podSelector": {"matchLabels": {builders.JOB_UID_LABEL: job_ref.uid}}}
    assert policy_["spec"]["podSelector"] == own["podSelector"]
    assert policy_["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy_["spec"]["egress"] == [{}], "egress to the store and the hub stays open"
    peers, metrics = policy_["spec"]["ingress"]
    assert peers == {"from": [own]}, "every port between the job's own pods (NCCL opens its own)"
    assert metrics == {"ports": [{"protocol": "TCP", "port": 9400}], "from": [scraper]}
    assert policy_["metadata"]["ownerReferences"][0]["uid"] == job_ref.uid
    assert builders.build_network_policy(job_ref, OperatorSettings(trainer_network_policy=False)) is None
