"""Pure functions from a validated FineTuneJob to the Kubernetes objects it owns, as plain dicts.

No I/O: a handler runs `policy.preflight`, then `build_children`, and creates (or adopts) each
object in the order returned. Every child carries an owner reference to the FineTuneJob, so
deleting the job deletes them.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from finetune_operator import api, policy
from finetune_operator.api import FineTuneJobSpec
from finetune_operator.policy import MethodDecision, required_secrets
from finetune_operator.settings import OperatorSettings
from finetune_trainer import config as tc

Manifest = dict[str, Any]

TRAINER_CONTAINER = "trainer"
CONFIG_DIR = "/etc/finetune"
CONFIG_KEY = "config.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
WORK_DIR = "/workspace"
OUTPUT_DIR = f"{WORK_DIR}/output"
CACHE_DIR = "/cache"
MASTER_PORT = 29500
GPU_RESOURCE = "nvidia.com/gpu"
SHM_SIZE_LIMIT = "16Gi"
SCRAPE_MARGIN_S = 1.0

COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
SECRETS_HASH_ANNOTATION = "finetune.dev/secrets-hash"
CONFIG_HASH_ANNOTATION = "finetune.dev/config-hash"
JOB_UID_LABEL = "finetune.dev/job-uid"
JOB_NAME_LABEL = "finetune.dev/job-name"

# Exit codes of the trainer (finetune_trainer.exitcodes.ExitCode), kept as numbers here so the
# Job spec is readable: these mean "retrying will not help" (6: training diverged).
FAIL_JOB_EXIT_CODES = (2, 3, 4, 5, 6, 7)
# SIGTERM handled, with a checkpoint committed (75) or outside training (76): the next pod resumes
# from the last committed checkpoint; not counted as a failure.
RESUME_EXIT_CODES = (75, 76)

MAX_NAME = 63
# An Indexed Job's pods are named <job>-<index>: keep room for "-63" so the hostname stays a label.
MAX_JOB_NAME = MAX_NAME - 4
_HASH_LEN = 8


# ---------------------------------------------------------------------------------------------
# Identity and names


@dataclass(frozen=True)
class JobRef:
    """The FineTuneJob being reconciled: just what children need to point back at it."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> JobRef:
        return cls(str(metadata["name"]), str(metadata["namespace"]), str(metadata["uid"]))


def short_hash(text: str, length: int = _HASH_LEN) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def dns_label(base: str, suffix: str = "", max_length: int = MAX_NAME) -> str:
    """A DNS-1035 label (lowercase, starts with a letter, at most `max_length` characters) made of
    `base` and `suffix`. Too long: `base` is cut and a hash of the full name keeps it unique."""
    clean = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-") or "job"
    if not clean[0].isalpha():
        clean = f"ftj-{clean}"
    tail = f"-{suffix}" if suffix else ""
    name = clean + tail
    if len(name) <= max_length:
        return name
    room = max_length - len(tail) - _HASH_LEN - 1
    return f"{clean[:room].rstrip('-')}-{short_hash(base + tail)}{tail}"


@dataclass(frozen=True)
class ChildNames:
    job: str
    config: str
    progress: str
    trainer: str  # ServiceAccount, Role and RoleBinding
    service: str


def child_names(job_name: str) -> ChildNames:
    return ChildNames(
        job=dns_label(job_name, max_length=MAX_JOB_NAME),
        config=dns_label(job_name, "config"),
        progress=dns_label(job_name, "progress"),
        trainer=dns_label(job_name, "trainer"),
        service=dns_label(job_name, "workers"),
    )


def labels(job: JobRef) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "finetune-trainer",
        "app.kubernetes.io/instance": child_names(job.name).job,
        "app.kubernetes.io/managed-by": "finetune-operator",
        JOB_NAME_LABEL: child_names(job.name).job,
        JOB_UID_LABEL: job.uid,
    }


def heartbeat_config_map(namespace: str, name: str, now: datetime) -> dict[str, Any]:
    """The operator's own ConfigMap, rewritten periodically so its watch always has traffic."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "finetune-operator",
                "app.kubernetes.io/component": "heartbeat",
                "app.kubernetes.io/managed-by": "finetune-operator",
            },
        },
        "data": {"time": now.isoformat(timespec="seconds")},
    }


def owner_reference(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the FineTuneJob that controls a child, from its ownerReferences; None if none does."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == api.KIND and ref.get("controller"):
            return str(ref.get("uid"))
    return None


def foreign_owner(obj: Mapping[str, Any] | None, uid: str) -> str | None:
    """The other FineTuneJob's uid when a child of this name belongs to another (a deleted job's
    child still being garbage-collected, a job recreated with the same name); else None."""
    if obj is None:
        return None
    owner = controller_uid(obj)
    return owner if owner is not None and owner != uid else None


def _metadata(job: JobRef, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": labels(job),
        "ownerReferences": [owner_reference(job)],
    }


# ---------------------------------------------------------------------------------------------
# Trainer config


def _local_or_uri(source: str) -> str:
    return source.removeprefix("file://") if source.startswith("file://") else source


def _dataset_source(source: str) -> str:
    """The trainer reads local paths, s3:// URIs and bare hub dataset ids."""
    if source.startswith("hf://"):
        return source.removeprefix("hf://").removeprefix("datasets/")
    return _local_or_uri(source)


def _goal(goal: api.GoalSpec) -> tc.Goal:
    criteria = [
        tc.SuccessCriterion(
            metric=c.metric.value,
            max_regression=c.max_regression,
            min_improvement=c.min_improvement,
            at_least=c.at_least,
            at_most=c.at_most,
            on_failure=c.on_failure,
        )
        for c in goal.success_criteria
    ]
    metrics: list[tc.TaskMetric] = [m.value for m in goal.metrics]
    return tc.Goal(
        task=goal.task, metrics=metrics, held_out_test=goal.held_out_test, success_criteria=criteria
    )


def _dataset(spec: FineTuneJobSpec) -> tc.Dataset:
    data = spec.dataset
    test_file = spec.goal.test_file
    return tc.Dataset(
        source=_dataset_source(data.source),
        test_source=_dataset_source(test_file) if test_file is not None else None,
        format=data.format.value,
        preprocessing=tc.Preprocessing(
            normalize=data.preprocessing.normalize,
            strip_boilerplate=data.preprocessing.strip_boilerplate,
            dedupe=data.preprocessing.dedupe.value,
            warn_duplicate_share=data.preprocessing.warn_duplicate_share,
            max_duplicate_share=data.preprocessing.max_duplicate_share,
            max_bad_example_share=data.preprocessing.max_bad_example_share,
        ),
        chunking=tc.Chunking(max_tokens=data.chunking.max_tokens, packing=data.chunking.packing),
        split=tc.Split(validation=data.split.validation, test=data.split.test, seed=data.split.seed),
        train_on_prompt=data.train_on_prompt,
    )


def _method(spec: FineTuneJobSpec, decision: MethodDecision) -> tc.Method:
    lora = spec.method.lora or api.LoraSpec()
    quant = spec.method.quantization or api.QuantizationSpec()
    deepspeed = spec.method.deepspeed or api.DeepSpeedSpec()
    modules = lora.target_modules
    full = decision.type == api.ResolvedMethodType.FULL
    return tc.Method(
        type=decision.type.value,
        reason=decision.reason,
        lora=tc.Lora(
            r=lora.r,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules="all-linear" if modules == ["all-linear"] else list(modules),
        ),
        quantization=tc.Quantization(
            bits=quant.bits,
            quant_type=quant.quant_type,
            double_quant=quant.double_quant,
            compute_dtype=quant.compute_dtype.value,
        ),
        deepspeed=tc.DeepSpeed(
            enabled=full,
            stage=3 if decision.deepspeed_stage == 3 else 2,
            offload=deepspeed.offload,
        ),
        allow_small_data_full_fine_tune=spec.method.allow_small_data_full_fine_tune,
    )


def _hyperparameters(hp: api.HyperparametersSpec) -> tc.Hyperparameters:
    return tc.Hyperparameters(
        epochs=hp.epochs,
        learning_rate=hp.learning_rate,
        batch_size=hp.batch_size,
        gradient_accumulation=hp.gradient_accumulation,
        seed=hp.seed,
        max_steps=hp.max_steps,
        warmup_ratio=hp.warmup_ratio,
        weight_decay=hp.weight_decay,
        lr_scheduler=hp.lr_scheduler.value,
        eval_steps=hp.eval_steps,
        gradient_checkpointing=hp.gradient_checkpointing,
    )


ChecksumMode = Literal["when_supported", "when_required"]


def _store(spec: FineTuneJobSpec, settings: OperatorSettings) -> tc.S3Store:
    """The job's store; a job without an endpoint uses the cluster's store from the settings."""
    store = spec.checkpoints.store
    path_style = store.path_style
    checksum_mode: ChecksumMode = (
        "when_supported" if store.checksum_mode.value == "when_supported" else "when_required"
    )
    endpoint, region = store.endpoint, store.region
    if not endpoint and settings.checkpoint_endpoint:
        endpoint = settings.checkpoint_endpoint
        region = region or settings.checkpoint_region
        if settings.checkpoint_path_style is not None:
            path_style = settings.checkpoint_path_style
        checksum_mode = settings.checkpoint_checksum_mode or checksum_mode
    return tc.S3Store(
        endpoint=endpoint,
        region=region or settings.checkpoint_region,
        bucket=store.bucket,
        prefix=store.prefix,
        path_style=path_style,
        checksum_mode=checksum_mode,
        credentials_secret=store.credentials_secret or "",
    )


def _checkpoints(spec: FineTuneJobSpec, settings: OperatorSettings) -> tc.Checkpoints:
    ckpt = spec.checkpoints
    return tc.Checkpoints(
        store=_store(spec, settings),
        every_steps=ckpt.every_steps,
        keep=ckpt.keep,
        verify_restore=ckpt.verify_restore,
        resume_from=spec.resume_from,
    )


def _validation(validation: api.ValidationSpec) -> tc.Validation:
    return tc.Validation(
        every_epoch=validation.every_epoch,
        prompts=list(validation.prompts),
        held_out_scenarios=[
            tc.Scenario(prompt=s.prompt, expect=s.expect) for s in validation.held_out_scenarios
        ],
        max_new_tokens=validation.max_new_tokens,
        max_generation_samples=validation.max_generation_samples,
    )


def _output(spec: FineTuneJobSpec, decision: MethodDecision) -> tc.Output:
    """Full fine-tuning saves the whole model already: a merge request only applies to adapters
    (the CRD refuses it with method.type full; here method auto may have resolved to full)."""
    adapter = decision.type != api.ResolvedMethodType.FULL
    return tc.Output(merge_adapter=spec.output.merge_adapter and adapter)


def metrics_linger_seconds(settings: OperatorSettings) -> float:
    """One scrape interval, and a second for a scrape that starts at its very end to finish: the
    final values a trainer sets just before it exits still reach Prometheus."""
    interval = settings.trainer_scrape_interval
    return interval + SCRAPE_MARGIN_S if interval else 0.0


def secret_env_names(spec: FineTuneJobSpec) -> list[str]:
    """Env vars the trainer gets from Secrets; it checks they are set (names only, never values)."""
    names = [var.name for var in spec.env if var.secret_key_ref is not None]
    if spec.checkpoints.store.credentials_secret is not None:
        names = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", *names]
    return names


def build_trainer_config(
    job: JobRef,
    spec: FineTuneJobSpec,
    decision: MethodDecision,
    settings: OperatorSettings,
    *,
    is_cloud: bool,
) -> tc.TrainerConfig:
    """The trainer's contract, rendered from the job and the operator's method decision."""
    return tc.TrainerConfig(
        job=tc.JobIdentity(namespace=job.namespace, name=job.name, uid=job.uid),
        goal=_goal(spec.goal),
        model=tc.ModelSource(source=_local_or_uri(spec.model.source), revision=spec.model.revision),
        dataset=_dataset(spec),
        method=_method(spec, decision),
        hyperparameters=_hyperparameters(spec.hyperparameters),
        environment=tc.Environment(is_cloud=is_cloud),
        checkpoints=_checkpoints(spec, settings),
        validation=_validation(spec.validation),
        output=_output(spec, decision),
        report=tc.Report(config_map=child_names(job.name).progress, namespace=job.namespace),
        metrics_port=settings.trainer_metrics_port,
        metrics_linger_seconds=metrics_linger_seconds(settings),
        output_dir=OUTPUT_DIR,
        required_env=secret_env_names(spec),
    )


# ---------------------------------------------------------------------------------------------
# ConfigMaps and RBAC


def build_config_map(job: JobRef, config: tc.TrainerConfig) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, child_names(job.name).config),
        "data": {CONFIG_KEY: config.to_json()},
    }


def build_progress_config_map(job: JobRef) -> Manifest:
    """Created empty; only the trainer writes it. A handler must never overwrite an existing one."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, child_names(job.name).progress),
        "data": {},
    }


def build_rbac(job: JobRef, service_account_annotations: Mapping[str, str] | None = None) -> list[Manifest]:
    """ServiceAccount, Role and RoleBinding: the trainer may get and patch its progress ConfigMap
    (by name) and nothing else. Annotations carry cloud identity (IAM roles for service accounts)."""
    names = child_names(job.name)
    account_meta = _metadata(job, names.trainer)
    if service_account_annotations:
        account_meta["annotations"] = dict(service_account_annotations)
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": account_meta,
        # Only the trainer pod, which opts in, gets a token.
        "automountServiceAccountToken": False,
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(job, names.trainer),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [names.progress],
                "verbs": ["get", "patch"],
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(job, names.trainer),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.trainer},
        "subjects": [{"kind": "ServiceAccount", "name": names.trainer, "namespace": job.namespace}],
    }
    return [account, role, binding]


def build_headless_service(job: JobRef, spec: FineTuneJobSpec) -> Manifest | None:
    """DNS names <job>-<index>.<service> for the rendezvous; only for more than one node."""
    if spec.resources.nodes <= 1:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, child_names(job.name).service),
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_UID_LABEL: job.uid},
            # Workers must resolve each other before any of them is ready.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def build_network_policy(job: JobRef, settings: OperatorSettings) -> Manifest | None:
    """Only the job's own pods reach its pods (the rendezvous, and the ports NCCL opens between
    ranks), and only the metrics scraper (`trainer_metrics_from`) their metrics port. Egress
    (object store, API server, model hub) stays open, as a rule of its own that admins can narrow."""
    if not settings.trainer_network_policy:
        return None
    own = {"podSelector": {"matchLabels": {JOB_UID_LABEL: job.uid}}}
    metrics: Manifest = {"ports": [{"protocol": "TCP", "port": settings.trainer_metrics_port}]}
    if settings.trainer_metrics_from:
        metrics["from"] = [dict(peer) for peer in settings.trainer_metrics_from]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(job, child_names(job.name).trainer),
        "spec": {
            **own,
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [own]}, metrics],
            "egress": [{}],
        },
    }


# ---------------------------------------------------------------------------------------------
# The training Job


def secret_versions_hash(resource_versions: Mapping[str, str]) -> str:
    """Hash of the referenced Secrets' resourceVersions: it changes when a Secret is rotated."""
    text = "\n".join(f"{name}={version}" for name, version in sorted(resource_versions.items()))
    return short_hash(text, 16)


def _env_value(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _env_secret(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def trainer_env(
    job: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings, *, is_cloud: bool
) -> list[dict[str, Any]]:
    """The environment contract of the trainer pod; secrets only as secretKeyRef."""
    env = [
        _env_value("JOB_ID", job.uid),
        _env_value("JOB_NAME", job.name),
        _env_value("JOB_NAMESPACE", job.namespace),
        _env_value("IS_CLOUD", "true" if is_cloud else "false"),
    ]
    if spec.user_id is not None:
        env.append(_env_value("USER_ID", spec.user_id))
    env += [
        _env_value("FINETUNE_CONFIG", CONFIG_PATH),
        # Servers bind to the pod's own address (several pods may share a host's network).
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        _env_value("METRICS_PORT", str(settings.trainer_metrics_port)),
        # The root filesystem is read-only: caches and home go to emptyDirs.
        _env_value("HOME", WORK_DIR),
        _env_value("XDG_CACHE_HOME", CACHE_DIR),
        _env_value("HF_HOME", f"{CACHE_DIR}/huggingface"),
        _env_value("TRITON_CACHE_DIR", f"{CACHE_DIR}/triton"),
    ]
    store = spec.checkpoints.store
    if store.credentials_secret is not None:
        env.append(_env_secret("AWS_ACCESS_KEY_ID", store.credentials_secret, store.access_key_id_key))
        env.append(
            _env_secret("AWS_SECRET_ACCESS_KEY", store.credentials_secret, store.secret_access_key_key)
        )
    env += _rendezvous_env(job, spec)
    for var in spec.env:
        if var.secret_key_ref is not None:
            env.append(_env_secret(var.name, var.secret_key_ref.name, var.secret_key_ref.key))
        else:
            env.append(_env_value(var.name, var.value or ""))
    return env


def _rendezvous_env(job: JobRef, spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """The trainer starts NPROC_PER_NODE processes, one per GPU (`finetune_trainer.launcher`); the
    rest tells the pods of a multi-node job how to find each other."""
    nodes = spec.resources.nodes
    procs = [_env_value("NPROC_PER_NODE", str(processes_per_pod(spec)))]
    if nodes <= 1:
        return procs
    names = child_names(job.name)
    index = {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}
    return [
        _env_value("MASTER_ADDR", f"{names.job}-0.{names.service}"),
        _env_value("MASTER_PORT", str(MASTER_PORT)),
        _env_value("NNODES", str(nodes)),
        _env_value("WORLD_SIZE", str(nodes * processes_per_pod(spec))),
        {"name": "NODE_RANK", "valueFrom": index},
        *procs,
    ]


def processes_per_pod(spec: FineTuneJobSpec) -> int:
    return max(spec.resources.gpus_per_node, 1)


def _resources(spec: FineTuneJobSpec, decision: MethodDecision, settings: OperatorSettings) -> dict[str, Any]:
    """Requests a cluster admin can plan with: CPU per process, host memory and local disk from
    the operator's estimates (`policy.host_memory_gib`, `policy.local_disk_gib`) unless the spec sets
    them. A memory limit only where the spec sets the memory: an estimate is no reason to kill."""
    res, per_pod = spec.resources, processes_per_pod(spec)
    ranks = res.nodes * per_pod
    offload = spec.method.deepspeed.offload if spec.method.deepspeed is not None else "none"
    memory = policy.host_memory_gib(decision, offload, per_pod=per_pod, ranks=ranks, gpus=res.gpus_per_node)
    disk = policy.local_disk_gib(decision, per_pod=per_pod, ranks=ranks, keep=spec.checkpoints.keep)
    requests: dict[str, str] = {
        "cpu": res.cpu or f"{settings.trainer_cpu_per_process * per_pod:g}",
        "memory": res.memory or f"{math.ceil(memory)}Gi",
        "ephemeral-storage": res.ephemeral_storage or f"{math.ceil(disk)}Gi",
    }
    limits: dict[str, str] = {}
    if res.memory is not None:
        limits["memory"] = res.memory
    if res.gpus_per_node > 0:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(res.gpus_per_node)
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")
_SUFFIX = {
    None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50,
}  # fmt: skip


def quantity_bytes(quantity: str) -> float:
    """A Kubernetes quantity as the schema admits it (api.Quantity), in units."""
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ValueError(f"not a quantity: {quantity!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def shm_size_limit(memory_limit: str | None) -> str:
    """/dev/shm is memory: what is written there counts against the pod's memory limit, so it may
    hold at most half of it (and SHM_SIZE_LIMIT without a limit)."""
    if memory_limit is None:
        return SHM_SIZE_LIMIT
    half = quantity_bytes(memory_limit) / 2
    return SHM_SIZE_LIMIT if half >= quantity_bytes(SHM_SIZE_LIMIT) else f"{int(half // 2**20)}Mi"


def _container_security_context(settings: OperatorSettings) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.trainer_run_as_user,
        "runAsGroup": settings.trainer_run_as_user,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security_context(settings: OperatorSettings) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.trainer_run_as_user,
        "runAsGroup": settings.trainer_run_as_user,
        "fsGroup": settings.trainer_run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _volumes(job: JobRef, spec: FineTuneJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): the config read-only, and writable emptyDirs for everything else."""
    volumes: list[dict[str, Any]] = [
        {
            "name": "config",
            "configMap": {
                "name": child_names(job.name).config,
                "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}],
            },
        },
        {"name": "workspace", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        # PyTorch data loaders and NCCL share memory through /dev/shm, which defaults to 64 MiB.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size_limit(spec.resources.memory)}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "workspace", "mountPath": WORK_DIR},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    return volumes, mounts


def _pod_failure_policy() -> dict[str, Any]:
    return {
        "rules": [
            # Preemption, eviction, node drain: not the job's fault; the next pod resumes.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": TRAINER_CONTAINER,
                    "operator": "In",
                    "values": list(FAIL_JOB_EXIT_CODES),
                },
            },
            {
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": TRAINER_CONTAINER,
                    "operator": "In",
                    "values": list(RESUME_EXIT_CODES),
                },
            },
        ]
    }


def _container(
    job: JobRef,
    spec: FineTuneJobSpec,
    decision: MethodDecision,
    settings: OperatorSettings,
    *,
    is_cloud: bool,
) -> Manifest:
    _, mounts = _volumes(job, spec)
    container: Manifest = {
        "name": TRAINER_CONTAINER,
        "image": settings.trainer_image,
        "imagePullPolicy": settings.trainer_image_pull_policy,
        # The image's ENTRYPOINT (tini, then the trainer) stays: tini forwards SIGTERM and reaps.
        "args": ["--config", CONFIG_PATH],
        "env": trainer_env(job, spec, settings, is_cloud=is_cloud),
        "ports": [{"name": "metrics", "containerPort": settings.trainer_metrics_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "securityContext": _container_security_context(settings),
    }
    if spec.resources.nodes > 1 or processes_per_pod(spec) > 1:
        container["ports"].append({"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"})
    container["resources"] = _resources(spec, decision, settings)
    return container


def _pod_spec(
    job: JobRef,
    spec: FineTuneJobSpec,
    decision: MethodDecision,
    settings: OperatorSettings,
    *,
    is_cloud: bool,
) -> Manifest:
    names = child_names(job.name)
    volumes, _ = _volumes(job, spec)
    pod: Manifest = {
        "serviceAccountName": names.trainer,
        # The trainer patches its progress ConfigMap, so it needs its (narrow) token.
        "automountServiceAccountToken": True,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "enableServiceLinks": False,
        "securityContext": _pod_security_context(settings),
        "containers": [_container(job, spec, decision, settings, is_cloud=is_cloud)],
        "volumes": volumes,
    }
    if spec.resources.node_selector:
        pod["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.resources.tolerations
        ]
    if spec.resources.nodes > 1:
        # Indexed Job pods get hostname <job>-<index>; the subdomain makes it resolvable.
        pod["subdomain"] = names.service
    return pod


def build_training_job(
    job: JobRef,
    spec: FineTuneJobSpec,
    decision: MethodDecision,
    settings: OperatorSettings,
    *,
    is_cloud: bool,
    config_hash: str,
    secrets_hash: str = "",
) -> Manifest:
    """The batch/v1 Job: Indexed across nodes when nodes > 1; retries resume from checkpoints."""
    nodes = spec.resources.nodes
    annotations = {CONFIG_HASH_ANNOTATION: config_hash}
    if secrets_hash:
        annotations[SECRETS_HASH_ANNOTATION] = secrets_hash
    job_spec: Manifest = {
        # A failed pod of a multi-node job takes its peers down with it (their collectives fail),
        # so every retry costs up to `nodes` pod failures: the limit counts retries of the group.
        "backoffLimit": spec.backoff_limit * nodes,
        "completions": nodes,
        "parallelism": nodes,
        "completionMode": "Indexed" if nodes > 1 else "NonIndexed",
        "suspend": spec.suspend,
        # A replacement starts only after the old pod has finished saving its checkpoint.
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": _pod_failure_policy(),
        "template": {
            "metadata": {"labels": labels(job), "annotations": annotations},
            "spec": _pod_spec(job, spec, decision, settings, is_cloud=is_cloud),
        },
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job, child_names(job.name).job),
        "spec": job_spec,
    }


# ---------------------------------------------------------------------------------------------
# Everything at once


def build_children(
    job: JobRef,
    spec: FineTuneJobSpec,
    decision: MethodDecision,
    settings: OperatorSettings,
    *,
    is_cloud: bool,
    secret_versions: Mapping[str, str] | None = None,
) -> list[Manifest]:
    """All children in creation order: identity and config first, the Job last, so a pod never
    starts without its ConfigMaps and permissions. `secret_versions` maps each referenced Secret to
    its resourceVersion (for the rotation hash)."""
    config = build_trainer_config(job, spec, decision, settings, is_cloud=is_cloud)
    config_map = build_config_map(job, config)
    rbac = build_rbac(job, settings.trainer_service_account_annotations)
    children = [*rbac, build_progress_config_map(job), config_map]
    for optional in (build_headless_service(job, spec), build_network_policy(job, settings)):
        if optional is not None:
            children.append(optional)
    children.append(
        build_training_job(
            job,
            spec,
            decision,
            settings,
            is_cloud=is_cloud,
            config_hash=short_hash(config_map["data"][CONFIG_KEY], 16),
            secrets_hash=secret_versions_hash(secret_versions or {}) if required_secrets(spec) else "",
        )
    )
    return children
