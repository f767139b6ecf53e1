"""The files in examples/ on a real control plane, what `kubectl apply` refuses, and an operator
killed mid-reconcile.

- Every FineTuneJob in examples/ is applied (suspended, so nothing trains) with dummy Secrets, and
  its children, owner references, status and events are what the example's comments promise.
- Invalid manifests are refused by the API server at apply time, each with a message naming the
  field: the schema's types, enums and bounds, and every CEL rule of the CRD.
- An operator killed with SIGKILL while reconciling, then restarted, leaves one Job per FineTuneJob.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.rest import ApiException
from urllib3.exceptions import ProtocolError

from localcluster import ClusterInfo
from localcluster.operators import OperatorProcess, start_operator
from localcluster.processes import free_port
from localcluster.testing import deep_merge, events_for, wait_for
from localcluster.tools import REPO_ROOT, tool

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
EXAMPLES = REPO_ROOT / "examples"
CANARY = "canary-5b71e0-dummy-secret-value"
RENDEZVOUS_PORT = "29500"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


# ---------------------------------------------------------------------------------------------
# Helpers


def kubectl(cluster: ClusterInfo, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool("kubectl")), "--kubeconfig", cluster.kubeconfig, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def kubectl_apply(
    cluster: ClusterInfo, namespace: str, doc: Mapping[str, Any], *, dry_run: bool = False
) -> subprocess.CompletedProcess[str]:
    """What a user runs. kubectl validates strictly, so a misspelt field fails instead of being
    silently pruned as it would be through a client that does not ask for strict validation."""
    args = ["-n", namespace, "apply", "--server-side", "-f", "-"]
    if dry_run:
        args.append("--dry-run=server")
    return kubectl(cluster, *args, stdin=yaml.safe_dump(dict(doc)))


def custom(kube: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube)


def get_ftj(kube: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return custom(kube).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)  # type: ignore[no-any-return]


def condition(obj: Mapping[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return cond  # type: ignore[no-any-return]
    return None


def referenced_secrets(spec: Mapping[str, Any]) -> dict[str, set[str]]:
    """Secret name -> keys, as a user reads them off the spec."""
    wanted: dict[str, set[str]] = {}
    store = spec["checkpoints"]["store"]
    if "credentialsSecret" in store:
        wanted.setdefault(store["credentialsSecret"], set()).update(
            {store.get("accessKeyIdKey", "accessKeyId"), store.get("secretAccessKeyKey", "secretAccessKey")}
        )
    for var in spec.get("env") or []:
        if "secretKeyRef" in var:
            wanted.setdefault(var["secretKeyRef"]["name"], set()).add(var["secretKeyRef"]["key"])
    return wanted


def create_secrets(core: client.CoreV1Api, namespace: str, wanted: Mapping[str, set[str]]) -> None:
    for name, keys in wanted.items():
        body = {"metadata": {"name": name}, "stringData": {key: f"{CANARY}-{key}" for key in keys}}
        core.create_namespaced_secret(namespace, body)


def minimal_job(name: str, **changes: Any) -> dict[str, Any]:
    spec = {
        "goal": {
            "task": "answer support tickets",
            "metrics": ["exact_match"],
            "successCriteria": [{"metric": "eval_loss", "maxRegression": 0.0}],
        },
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B", "parameters": "0.5B"},
        "dataset": {"source": "s3://data/tickets.jsonl", "format": "alpaca"},
        "method": {"type": "lora"},
        "checkpoints": {"store": {"bucket": "ckpt", "credentialsSecret": "s3-creds"}},
        "suspend": True,
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": deep_merge(spec, changes),
    }


# ---------------------------------------------------------------------------------------------
# The examples


@dataclass(frozen=True)
class Expected:
    """What applying an example must produce, in the words of its comments."""

    method: str
    nodes: int
    gpus: int
    is_cloud: bool
    deepspeed_stage: int | None = None


EXPECTED = {
    "quickstart.yaml": Expected(method="lora", nodes=1, gpus=1, is_cloud=False),
    "qlora-onprem.yaml": Expected(method="qlora", nodes=1, gpus=1, is_cloud=False),
    # The operator runs with FINETUNE_OPERATOR_ENVIRONMENT=onprem: the job's own environment wins.
    "full-deepspeed-cloud.yaml": Expected(method="full", nodes=2, gpus=8, is_cloud=True, deepspeed_stage=2),
    "lora-small-data.yaml": Expected(method="lora", nodes=1, gpus=1, is_cloud=False),
}


def job_examples() -> list[str]:
    """Every FineTuneJob file in examples/ (the folder also holds Helm values)."""
    names = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if any(d.get("kind") == "FineTuneJob" for d in docs):
            names.append(path.name)
    return names


def load_example(file: str, cluster: ClusterInfo) -> dict[str, Any]:
    """The example as a user would apply it, placeholders filled in, suspended so no pod starts."""
    text = (EXAMPLES / file).read_text().replace("${S3_ENDPOINT}", cluster.s3_endpoint)
    assert "${" not in text, f"{file} has a placeholder this test does not fill in"
    doc: dict[str, Any] = yaml.safe_load(text)
    doc["spec"]["suspend"] = True
    return doc


def test_every_example_has_expectations() -> None:
    assert set(job_examples()) == set(EXPECTED)


def env_of(container: Any) -> dict[str, Any]:
    return {e.name: e for e in container.env}


def assert_owned(obj: Any, owner_uid: str) -> None:
    refs = obj.metadata.owner_references or []
    assert [(r.kind, r.uid, r.controller) for r in refs] == [("FineTuneJob", owner_uid, True)], (
        f"{obj.kind} {obj.metadata.name} owner references: {refs}"
    )


@pytest.mark.parametrize("file", sorted(EXPECTED))
def test_example_applies_and_gets_its_children(
    kube: client.ApiClient,
    core: client.CoreV1Api,
    cluster: ClusterInfo,
    operator: Any,
    namespace: str,
    file: str,
) -> None:
    expected = EXPECTED[file]
    doc = load_example(file, cluster)
    name, spec = doc["metadata"]["name"], doc["spec"]
    create_secrets(core, namespace, referenced_secrets(spec))
    applied = kubectl_apply(cluster, namespace, doc)
    assert applied.returncode == 0, applied.stderr

    batch, rbac = client.BatchV1Api(kube), client.RbacAuthorizationV1Api(kube)
    job = wait_for(lambda: batch.read_namespaced_job(name, namespace), 60, f"the Job of {file}")
    ftj = wait_for(
        lambda: (
            (o := get_ftj(kube, namespace, name)).get("status", {}).get("phase") == "Suspended"
            and o["status"].get("method")
            and o
        ),
        30,
        "phase Suspended and the method decision",
        describe=lambda: get_ftj(kube, namespace, name).get("status"),
    )
    uid = ftj["metadata"]["uid"]

    # Status: the resolved method with a reason, also announced as an event.
    method = ftj["status"]["method"]
    assert method["type"] == expected.method
    assert method["reason"]
    assert method.get("deepspeedStage") == expected.deepspeed_stage
    if expected.deepspeed_stage:
        assert f"ZeRO-{expected.deepspeed_stage}" in method["reason"]
    chosen = [e for e in events_for(core, namespace, name) if e.startswith("MethodChosen")]
    assert chosen and method["reason"] in chosen[0]

    # The Job: suspended, one pod per node, GPUs requested, the environment contract.
    assert job.spec.suspend is True
    assert (job.spec.completions, job.spec.parallelism) == (expected.nodes, expected.nodes)
    assert job.spec.completion_mode == ("Indexed" if expected.nodes > 1 else "NonIndexed")
    pod = job.spec.template.spec
    container = pod.containers[0]
    assert container.resources.requests["nvidia.com/gpu"] == str(expected.gpus)
    assert container.resources.limits["nvidia.com/gpu"] == str(expected.gpus)
    assert (pod.node_selector or {}) == spec["resources"].get("nodeSelector", {})
    env = env_of(container)
    assert env["JOB_ID"].value == uid
    assert env["IS_CLOUD"].value == ("true" if expected.is_cloud else "false")
    for var in spec.get("env") or []:
        if "secretKeyRef" in var:
            ref = env[var["name"]].value_from.secret_key_ref
            assert (ref.name, ref.key) == (var["secretKeyRef"]["name"], var["secretKeyRef"]["key"])
            assert env[var["name"]].value is None
    assert CANARY not in json.dumps(kube.sanitize_for_serialization(job))

    service_name = f"{name}-workers"
    if expected.nodes > 1:
        assert env["MASTER_ADDR"].value == f"{name}-0.{service_name}"
        assert env["MASTER_PORT"].value == RENDEZVOUS_PORT
        assert env["WORLD_SIZE"].value == str(expected.nodes * expected.gpus)
        assert env["NODE_RANK"].value_from.field_ref.field_path == COMPLETION_INDEX
        assert pod.subdomain == service_name
        service = core.read_namespaced_service(service_name, namespace)
        assert service.spec.cluster_ip == "None"
        assert [p.port for p in service.spec.ports] == [int(RENDEZVOUS_PORT)]
        assert_owned(service, uid)
    else:
        assert "MASTER_ADDR" not in env
        with pytest.raises(ApiException) as missing:
            core.read_namespaced_service(service_name, namespace)
        assert missing.value.status == 404

    # The trainer's config carries the operator's decision; the progress ConfigMap exists.
    config_map = core.read_namespaced_config_map(f"{name}-config", namespace)
    config = json.loads(config_map.data["config.json"])
    assert config["method"]["type"] == expected.method
    assert config["method"]["reason"] == method["reason"]
    assert config["method"]["deepspeed"]["enabled"] is (expected.method == "full")
    assert config["environment"]["isCloud"] is expected.is_cloud
    assert config["job"]["uid"] == uid
    assert CANARY not in json.dumps(config)
    progress = core.read_namespaced_config_map(f"{name}-progress", namespace)

    # The trainer's identity may touch its progress ConfigMap and nothing else.
    account = core.read_namespaced_service_account(f"{name}-trainer", namespace)
    role = rbac.read_namespaced_role(f"{name}-trainer", namespace)
    binding = rbac.read_namespaced_role_binding(f"{name}-trainer", namespace)
    assert [(r.resources, r.resource_names, sorted(r.verbs)) for r in role.rules] == [
        (["configmaps"], [f"{name}-progress"], ["get", "patch"])
    ]
    assert [(s.kind, s.name) for s in binding.subjects] == [("ServiceAccount", f"{name}-trainer")]
    assert pod.service_account_name == f"{name}-trainer"

    for child in (job, config_map, progress, account, role, binding):
        assert_owned(child, uid)

    # `kubectl describe ftj` shows every preflight check as passed, and keeps showing it.
    def preflight_passed() -> bool:
        obj = get_ftj(kube, namespace, name)
        found = [condition(obj, t) for t in ("SpecValid", "SecretsReady", "MemoryFits")]
        return all(c and c["status"] == "True" for c in found)

    wait_for(
        preflight_passed,
        30,
        "conditions SpecValid, SecretsReady and MemoryFits to be True",
        describe=lambda: get_ftj(kube, namespace, name)["status"].get("conditions"),
    )


def test_small_data_example_refuses_full_and_names_the_alternative(
    kube: client.ApiClient,
    core: client.CoreV1Api,
    cluster: ClusterInfo,
    operator: Any,
    namespace: str,
) -> None:
    doc = load_example("lora-small-data.yaml", cluster)
    create_secrets(core, namespace, referenced_secrets(doc["spec"]))
    examples = doc["spec"]["dataset"]["expectedExamples"]
    assert examples < 1000, "the example should stay below the refusal threshold"
    # The lora block does not apply to full (a CEL rule says so), so a user removes it.
    full = deep_merge(
        doc, {"metadata": {"name": "faq-full"}, "spec": {"method": {"type": "full", "lora": None}}}
    )
    applied = kubectl_apply(cluster, namespace, full)
    assert applied.returncode == 0, applied.stderr

    refused = wait_for(
        lambda: (o := get_ftj(kube, namespace, "faq-full")).get("status", {}).get("phase") == "Failed" and o,
        60,
        "the full variant to be refused",
    )
    cond = condition(refused, "DataSufficient")
    assert cond and cond["status"] == "False" and cond["reason"] == "TooFewExamplesForFull"
    for text in (cond["message"], refused["status"]["message"]):
        assert str(examples) in text and "lora" in text and "allowSmallDataFullFineTune" in text
    events = events_for(core, namespace, "faq-full")
    assert any(e.startswith("TooFewExamplesForFull") and str(examples) in e for e in events), events
    assert not client.BatchV1Api(kube).list_namespaced_job(namespace).items

    # The documented escape hatch launches it, with a warning that still recommends LoRA.
    allowed = deep_merge(full, {"metadata": {"name": "faq-full-allowed"}})
    allowed["spec"]["method"]["allowSmallDataFullFineTune"] = True
    applied = kubectl_apply(cluster, namespace, allowed)
    assert applied.returncode == 0, applied.stderr
    wait_for(
        lambda: client.BatchV1Api(kube).read_namespaced_job("faq-full-allowed", namespace),
        60,
        "the Job of the allowed variant",
    )
    warned = wait_for(
        lambda: [e for e in events_for(core, namespace, "faq-full-allowed") if "FewExamplesForFull" in e],
        30,
        "a FewExamplesForFull warning on the allowed variant",
    )
    assert "allowed by spec.method.allowSmallDataFullFineTune" in warned[0] and "lora" in warned[0]


# ---------------------------------------------------------------------------------------------
# Refused at apply time

SECRET_REF = {"name": "app-secrets", "key": "value"}

# (id, changes to a valid job, the field the message names, a phrase of the message)
REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    # CEL rules (x-kubernetes-validations), one or more cases each
    ("qlora-without-quantization", {"method": {"type": "qlora"}}, "spec.method.quantization", "4-bit"),
    (
        "quantization-with-lora",
        {"method": {"type": "lora", "quantization": {"bits": 4}}},
        "spec.method.quantization",
        "applies only to method.type qlora, not lora",
    ),
    (
        "deepspeed-with-lora",
        {"method": {"type": "lora", "deepspeed": {"stage": 2}}},
        "spec.method.deepspeed",
        "applies only to method.type full, not lora",
    ),
    ("lora-block-with-full", {"method": {"type": "full", "lora": {"r": 8}}}, "spec.method.lora", "full"),
    (
        "merge-with-full",
        {"method": {"type": "full"}, "output": {"mergeAdapter": True}},
        "spec.output.mergeAdapter",
        "there is no adapter to merge",
    ),
    (
        "params-offload-with-stage-2",
        {"method": {"type": "full", "deepspeed": {"stage": 2, "offload": "optimizer+params"}}},
        "spec.method.deepspeed.offload",
        "stage 3",
    ),
    (
        "two-nodes-with-lora",
        {"resources": {"nodes": 2}},
        "spec.resources.nodes",
        "needs spec.method.type full",
    ),
    (
        "audio-with-qlora",
        {"dataset": {"format": "audio"}, "method": {"type": "qlora", "quantization": {"bits": 4}}},
        "spec.method.type",
        "audio",
    ),
    ("no-held-out-test-data", {"goal": {"heldOutTest": False}}, "spec.goal.heldOutTest", "goal.testFile"),
    (
        "held-out-test-with-empty-split",
        {"dataset": {"split": {"test": 0, "validation": 0.1}}},
        "spec.dataset.split.test",
        "split.test",
    ),
    (
        "split-holds-out-too-much",
        {"dataset": {"split": {"validation": 0.3, "test": 0.3}}},
        "spec.dataset.split",
        "at most 0.5",
    ),
    (
        "criterion-on-unmeasured-metric",
        {"goal": {"successCriteria": [{"metric": "token_f1", "atLeast": 0.5}]}},
        "spec.goal.successCriteria",
        "goal.metrics",
    ),
    (
        "criterion-with-two-rules",
        {"goal": {"successCriteria": [{"metric": "eval_loss", "maxRegression": 0.0, "atMost": 2.0}]}},
        "spec.goal.successCriteria[0]",
        "exactly one of",
    ),
    (
        "token-as-literal-value",
        {"env": [{"name": "HF_TOKEN", "value": "hf_abc"}]},
        "spec.env[0].value",
        "HF_TOKEN looks like a secret",
    ),
    (
        "value-and-secret-ref",
        {"env": [{"name": "MODE", "value": "a", "secretKeyRef": SECRET_REF}]},
        "spec.env[0]",
        "exactly one of value or secretKeyRef",
    ),
    (
        "reserved-variable",
        {"env": [{"name": "JOB_ID", "value": "forged"}]},
        "spec.env[0].name",
        "set by the operator",
    ),
    # The schema: required fields, enums, bounds, patterns, unknown fields
    ("no-checkpoint-store", {"checkpoints": None}, "spec.checkpoints", "Required value"),
    ("unknown-method", {"method": {"type": "dpo"}}, "spec.method.type", "Unsupported value"),
    ("unknown-format", {"dataset": {"format": "csv"}}, "spec.dataset.format", "Unsupported value"),
    ("unknown-metric", {"goal": {"metrics": ["bleu"]}}, "spec.goal.metrics[0]", "Unsupported value"),
    ("no-metrics", {"goal": {"metrics": []}}, "spec.goal.metrics", "at least 1"),
    ("model-without-scheme", {"model": {"source": "Qwen/Qwen2.5-0.5B"}}, "spec.model.source", "should match"),
    (
        "parameters-in-words",
        {"model": {"parameters": "half a billion"}},
        "spec.model.parameters",
        "should match",
    ),
    (
        "negative-learning-rate",
        {"hyperparameters": {"learningRate": -1}},
        "spec.hyperparameters.learningRate",
        "greater than 0",
    ),
    (
        "too-many-nodes",
        {"method": {"type": "full"}, "resources": {"nodes": 65}},
        "spec.resources.nodes",
        "less than or equal to 64",
    ),
    (
        "grace-too-short-to-checkpoint",
        {"terminationGracePeriodSeconds": 5},
        "spec.terminationGracePeriodSeconds",
        "greater than or equal to 30",
    ),
    ("resume-from-gcs", {"resumeFrom": "gs://bucket/x"}, "spec.resumeFrom", "should match"),
    (
        "secret-name-not-dns",
        {"checkpoints": {"store": {"credentialsSecret": "S3_Creds"}}},
        "spec.checkpoints.store.credentialsSecret",
        "should match",
    ),
    (
        "misspelt-field",
        {"hyperparameter": {"epochs": 1}},
        "spec.hyperparameter",
        "field not declared in schema",
    ),
    (
        "secret-value-in-store",
        {"checkpoints": {"store": {"secretAccessKey": "plain"}}},
        "spec.checkpoints.store.secretAccessKey",
        "field not declared in schema",
    ),
]


def test_refusal_table_covers_every_cel_rule() -> None:
    """A new CEL rule needs a row here (the transition rules are exercised below)."""
    crd = yaml.safe_load((REPO_ROOT / "crds" / "finetune.dev_finetunejobs.yaml").read_text())
    rules: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            rules.extend(r["rule"] for r in node.get("x-kubernetes-validations", []))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(crd["spec"]["versions"][0]["schema"])
    plain = [r for r in rules if "oldSelf" not in r]
    assert len(plain) == 16, "a CEL rule was added or removed: cover it in REFUSED"
    assert len(rules) - len(plain) == 4, "a transition rule was added or removed: cover it below"


@pytest.mark.parametrize(
    ("changes", "field", "phrase"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_invalid_manifest_is_refused_at_apply_time_naming_the_field(
    cluster: ClusterInfo, crd: None, namespace: str, changes: dict[str, Any], field: str, phrase: str
) -> None:
    result = kubectl_apply(cluster, namespace, minimal_job("bad", **changes), dry_run=True)
    assert result.returncode != 0, f"accepted: {result.stdout}"
    assert field in result.stderr, result.stderr
    assert phrase in result.stderr, result.stderr


IMMUTABLE: list[tuple[str, dict[str, Any], str]] = [
    ("model", {"model": {"source": "hf://Qwen/Qwen2.5-1.5B"}}, "spec.model is immutable"),
    ("dataset", {"dataset": {"source": "s3://data/other.jsonl"}}, "spec.dataset is immutable"),
    ("method", {"method": {"type": "qlora", "quantization": {"bits": 4}}}, "spec.method is immutable"),
    ("user", {"userId": "mallory"}, "spec.userId is recorded when the job is created"),
]


def test_fields_fixed_at_creation_are_refused_on_update(
    cluster: ClusterInfo, crd: None, namespace: str
) -> None:
    original = minimal_job("fixed", userId="alice")
    created = kubectl_apply(cluster, namespace, original)
    assert created.returncode == 0, created.stderr
    for field, changes, phrase in IMMUTABLE:
        changed = deep_merge(original, {"spec": changes})
        result = kubectl_apply(cluster, namespace, changed, dry_run=True)
        assert result.returncode != 0, f"changing {field} was accepted"
        assert phrase in result.stderr, result.stderr
    # Mutable fields still change.
    resumed = kubectl_apply(
        cluster, namespace, deep_merge(original, {"spec": {"suspend": False}}), dry_run=True
    )
    assert resumed.returncode == 0, resumed.stderr


# ---------------------------------------------------------------------------------------------
# Operators killed mid-reconcile, and replicas
#
# These tests run their own operators in a `solo-` namespace, which the session's operator skips:
# whatever happens there is the work of the operators the test started. Children have
# deterministic names, the Job is created only when a read finds none, and kopf keeps its handler
# progress in annotations, so a restarted process (or the replica that takes over) reads what its
# killed predecessor wrote. Any step that is not idempotent (a generated name, a create that is not
# an apply, a delete-and-recreate of the Job) shows up as a second Job or a Job that was deleted.

RESTART_JOBS = 8
HELD = "restart-held"  # its model has no declared size: its reconcile waits on the model hub


@dataclass
class JobWatch:
    """Every ADDED/DELETED event of batch/v1 Jobs in a namespace, from before the test acts."""

    events: list[tuple[str, str, str]]
    stopper: watch.Watch
    thread: threading.Thread


def watch_jobs(kube: client.ApiClient, namespace: str) -> JobWatch:
    batch = client.BatchV1Api(kube)
    version = batch.list_namespaced_job(namespace).metadata.resource_version
    events: list[tuple[str, str, str]] = []
    stopper = watch.Watch()

    def run() -> None:
        # Stopping the watch cuts the stream mid-response: that error is the expected end.
        with contextlib.suppress(ProtocolError):
            for event in stopper.stream(
                batch.list_namespaced_job, namespace, resource_version=version, timeout_seconds=300
            ):
                if isinstance(event, dict) and event.get("object") is not None:
                    obj = event["object"]
                    events.append((event["type"], obj.metadata.name, obj.metadata.uid))

    thread = threading.Thread(target=run, name="job-watch", daemon=True)
    thread.start()
    return JobWatch(events, stopper, thread)


@pytest.fixture
def jobs(kube: client.ApiClient, core: client.CoreV1Api, solo_namespace: str) -> Iterator[JobWatch]:
    """The solo namespace with the jobs' Secret, and a watch of its Jobs from before the test acts."""
    create_secrets(core, solo_namespace, {"s3-creds": {"accessKeyId", "secretAccessKey"}})
    watched = watch_jobs(kube, solo_namespace)
    yield watched
    watched.stopper.stop()


class SilentHub:
    """A model hub that accepts connections and never answers: an operator asking it for a model's
    size is held inside its reconcile until the test lets go (or the lookup times out)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, name="silent-hub", daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.server.accept()[0])

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()


def scoped_env(namespace: str, **extra: str) -> dict[str, str]:
    return {
        "FINETUNE_OPERATOR_NAMESPACES": namespace,
        "FINETUNE_OPERATOR_ENVIRONMENT": "onprem",
        "FINETUNE_OPERATOR_GPU_MEMORY_GIB": "80",
        "FINETUNE_OPERATOR_METRICS_PORT": "0",
        "FINETUNE_OPERATOR_LOG_LEVEL": "DEBUG",  # kopf logs "is invoked" when a handler starts
        **extra,
    }


def reconciles(op: OperatorProcess) -> tuple[int, int]:
    text = op.log_text()
    return text.count("Handler 'reconcile' is invoked"), text.count("Handler 'reconcile' succeeded")


def assert_one_job_each(
    kube: client.ApiClient,
    core: client.CoreV1Api,
    namespace: str,
    names: list[str],
    jobs: JobWatch,
    context: str,
) -> dict[str, dict[str, Any]]:
    """Every FineTuneJob has exactly one Job, never deleted, and one of each ConfigMap."""
    found = client.BatchV1Api(kube).list_namespaced_job(namespace).items
    ftjs = {name: get_ftj(kube, namespace, name) for name in names}
    owners = sorted(j.metadata.owner_references[0].uid for j in found)
    assert owners == sorted(o["metadata"]["uid"] for o in ftjs.values()), context
    assert sorted(j.metadata.name for j in found) == sorted(names), context
    jobs.stopper.stop()
    adds = [(name, uid) for kind, name, uid in jobs.events if kind == "ADDED"]
    assert sorted(adds) == sorted((j.metadata.name, j.metadata.uid) for j in found), context
    assert not [e for e in jobs.events if e[0] == "DELETED"], context
    configs = [c.metadata.name for c in core.list_namespaced_config_map(namespace).items]
    for name in names:
        assert configs.count(f"{name}-config") == configs.count(f"{name}-progress") == 1, name
    for name, obj in ftjs.items():
        status = obj["status"]
        assert status["phase"] == "Suspended", f"{name}: {status}"
        assert status["observedGeneration"] == obj["metadata"]["generation"]
        assert status["method"]["type"] == "lora"
        for type_ in ("SpecValid", "SecretsReady"):
            cond = condition(obj, type_)
            assert cond and cond["status"] == "True", f"{name} {type_}: {cond}"
    return ftjs


def assert_session_operator_stayed_out(cluster: ClusterInfo, namespace: str) -> None:
    """The premise: no operator but the test's own acted here (the session's one, if another test
    started it, logs every object it handles by namespace)."""
    log = Path(cluster.run_dir) / "logs" / "operator.log"
    if log.exists():
        assert namespace not in log.read_text(errors="replace"), "the session's operator acted here"


def test_operator_killed_mid_reconcile_and_restarted_creates_no_duplicate_job(
    kube: client.ApiClient,
    core: client.CoreV1Api,
    cluster: ClusterInfo,
    crd: None,
    solo_namespace: str,
    jobs: JobWatch,
    tmp_path: Path,
) -> None:
    namespace = solo_namespace
    hub = SilentHub()
    first = start_operator(
        cluster,
        tmp_path / "first.log",
        scoped_env(
            namespace, FINETUNE_OPERATOR_HUB_ENDPOINT=hub.url, FINETUNE_OPERATOR_MODEL_SIZE_TIMEOUT="60"
        ),
    )
    names = [HELD] + [f"restart-{i}" for i in range(RESTART_JOBS - 1)]
    try:
        held = minimal_job(HELD)
        held["spec"]["model"] = {"source": "hf://org/held-model"}  # no parameters: the hub is asked
        custom(kube).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, held)
        wait_for(lambda: hub.held, 60, "the held reconcile to ask the hub", interval=0.02)
        for name in names[1:]:
            custom(kube).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, minimal_job(name))
        wait_for(lambda: reconciles(first)[1] >= 2, 60, "two other reconciles to finish", interval=0.02)
        invoked, succeeded = reconciles(first)
        os.kill(first.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
    finally:
        first.stop()
        hub.close()
    # The premise: the held reconcile was in flight when the kill landed, and had written nothing.
    assert invoked > succeeded, (invoked, succeeded)
    assert "status" not in get_ftj(kube, namespace, HELD) or not get_ftj(kube, namespace, HELD)["status"].get(
        "method"
    )
    assert not [e for e in jobs.events if e[1] == HELD]
    context = f"killed with {invoked - succeeded} reconcile(s) in flight"

    second = start_operator(
        cluster,
        tmp_path / "restarted.log",
        scoped_env(namespace, FINETUNE_OPERATOR_HUB_ENDPOINT=f"http://127.0.0.1:{free_port()}"),
    )
    try:
        # On start-up the restarted operator resumes every job (most already have their children).
        wait_for(
            lambda: reconciles(second)[1] >= RESTART_JOBS,
            120,
            "the restarted operator to reconcile every job",
            describe=lambda: second.log_text()[-3000:],
        )
        assert_one_job_each(kube, core, namespace, names, jobs, context)
    finally:
        second.stop()
    assert "Traceback" not in second.log_text()
    assert_session_operator_stayed_out(cluster, namespace)


LEASE_S = 6  # short, so the test waits little; the chart uses 15 s


def reconciled(obj: Mapping[str, Any]) -> bool:
    status = obj.get("status") or {}
    return (
        status.get("phase") == "Suspended"
        and status.get("observedGeneration") == obj["metadata"]["generation"]
    )


def lease_holder(kube: client.ApiClient, namespace: str) -> str:
    try:
        lease = client.CoordinationV1Api(kube).read_namespaced_lease("finetune-operator", namespace)
    except ApiException:
        return ""
    return str(lease.spec.holder_identity or "")


def holds(op: OperatorProcess) -> Callable[[str], bool]:
    return lambda holder: holder.endswith(f"_{op.pid}")


def test_two_replicas_one_acts_and_the_other_takes_over_when_it_is_killed(
    kube: client.ApiClient,
    core: client.CoreV1Api,
    cluster: ClusterInfo,
    crd: None,
    solo_namespace: str,
    jobs: JobWatch,
    tmp_path: Path,
) -> None:
    namespace = solo_namespace
    env = scoped_env(
        namespace,
        FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE=namespace,
        FINETUNE_OPERATOR_LEADER_ELECTION_SECONDS=str(LEASE_S),
    )
    first = start_operator(cluster, tmp_path / "first.log", env)
    second: OperatorProcess | None = None
    names = [f"replica-{i}" for i in range(RESTART_JOBS)]
    try:
        wait_for(lambda: holds(first)(lease_holder(kube, namespace)), 30, "the first replica to lead")
        second = start_operator(cluster, tmp_path / "second.log", env)
        assert second.health()["leader"] is False and first.health()["leader"] is True
        for name in names:
            custom(kube).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, minimal_job(name))
        wait_for(lambda: reconciles(first)[1] >= 2, 60, "the leader to start reconciling", interval=0.02)
        invoked, succeeded = reconciles(first)
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        first.process.wait(timeout=10)
        # Until now the follower only served: no handler of it ran.
        assert reconciles(second) == (0, 0), second.log_text()[-2000:]
        wait_for(lambda: holds(second)(lease_holder(kube, namespace)), 3 * LEASE_S, "the second to take over")
        takeover_s = time.monotonic() - killed_at
        wait_for(
            lambda: all(reconciled(get_ftj(kube, namespace, n)) for n in names),
            120,
            "the new leader to finish every job",
            describe=lambda: second.log_text()[-3000:],
        )
        # /healthz says which replica acts (kopf re-runs its probes at most every 10 s).
        wait_for(lambda: second.health()["leader"] is True, 15, "the new leader's /healthz to say so")
        context = f"killed with {invoked - succeeded} reconcile(s) in flight, {succeeded} done"
        assert succeeded < RESTART_JOBS, context  # the premise: work was left for the new leader
        assert takeover_s <= LEASE_S + 3, f"took over after {takeover_s:.1f}s"
        assert_one_job_each(kube, core, namespace, names, jobs, context)
        # One event per transition: none posted twice by the two replicas (kopf's own handler-log
        # events, "Logging", repeat by design when a new leader resumes a job).
        for name in names:
            events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
            seen = [(e.reason, e.message, e.count or 1) for e in events.items if e.reason != "Logging"]
            assert seen, name
            assert len({(r, m) for r, m, _ in seen}) == len(seen), f"{name}: {seen}"
            assert all(count == 1 for _, _, count in seen), f"{name}: {seen}"
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert "Traceback" not in second.log_text()
    assert_session_operator_stayed_out(cluster, namespace)
