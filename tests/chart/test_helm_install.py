"""The chart installed with helm into a real control plane: the operator pod runs under the chart's
ServiceAccount with RBAC enforced, reconciles a FineTuneJob to a running training Job (also under Pod
Security "restricted"), rolls on upgrade, and leaves only the CRD and the jobs behind on uninstall.

These tests run in order on a cluster of their own, so no other operator touches their objects."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from localcluster import ClusterInfo, ClusterOptions, LocalCluster
from localcluster.processes import free_port
from localcluster.testing import deep_merge, events_for, pod_log, wait_for
from localcluster.tools import MissingToolError, check_all, tool

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
LOCAL_VALUES = REPO / "examples" / "values-local.yaml"
EXAMPLE_JOB = REPO / "examples" / "quickstart.yaml"
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
CRD_NAME = "finetunejobs.finetune.dev"

RELEASE, OPERATOR_NS = "ft", "finetune-system"
OPERATOR = f"{RELEASE}-finetune-operator"
TEAM, STRICT, OTHER = "team-a", "team-strict", "team-other"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
# What `helm uninstall` must remove; every one carries these labels.
RELEASE_SELECTOR = f"app.kubernetes.io/managed-by=Helm,app.kubernetes.io/instance={RELEASE}"
RELEASE_KINDS = "deployments,serviceaccounts,services,configmaps,secrets,roles,rolebindings"


@dataclass(frozen=True)
class Stack:
    """The cluster, an admin client, and helm/kubectl bound to its kubeconfig."""

    info: ClusterInfo
    api: client.ApiClient

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run(str(tool("helm")), "--kubeconfig", self.info.kubeconfig, *args)

    def kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run(str(tool("kubectl")), "--kubeconfig", self.info.kubeconfig, *args)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=180)


def port_values() -> list[str]:
    # Pods share the host's ports in the local cluster: every operator pod gets free ones.
    keys = ("operator.metricsPort", "operator.healthPort", "webhook.port")
    return [arg for key in keys for arg in ("--set", f"{key}={free_port()}")]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    try:
        check_all()
    except MissingToolError as exc:
        pytest.skip(str(exc))
    # Not under /tmp: the operator pod mounts an emptyDir at /tmp, which would hide a run directory
    # there from the node agent's later bind mounts (the service-account token among them).
    (REPO / ".run").mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="helm-install-", dir=REPO / ".run"))
    options = ClusterOptions(run_dir=run_dir, tie_to_parent=True, with_prometheus=False)
    try:
        with LocalCluster(options) as info:
            yield Stack(info, config.new_client_from_config(info.kubeconfig))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def create_namespace(stack: Stack, name: str, labels: dict[str, str] | None = None) -> None:
    stack.core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
    wait_for(lambda: stack.core.read_namespaced_service_account("default", name), 30, f"default SA in {name}")


def create_secrets(stack: Stack, namespace: str) -> None:
    info = stack.info
    for name, data in {
        "s3-creds": {"accessKeyId": info.s3_access_key, "secretAccessKey": info.s3_secret_key},
        "persistence": {"serviceRoleKey": "not-a-real-key"},
    }.items():
        stack.core.create_namespaced_secret(namespace, {"metadata": {"name": name}, "stringData": data})


@pytest.fixture(scope="module")
def namespaced(stack: Stack) -> Stack:
    """The chart installed in namespaced mode for TEAM and STRICT; OTHER is not handled."""
    # The operator's own namespace enforces "restricted" too: the chart says its pod complies.
    create_namespace(stack, OPERATOR_NS, RESTRICTED)
    create_namespace(stack, TEAM)
    create_namespace(stack, STRICT, RESTRICTED)
    create_namespace(stack, OTHER)
    for namespace in (TEAM, STRICT, OTHER):
        create_secrets(stack, namespace)
    result = stack.helm(
        "install", RELEASE, str(CHART), "--namespace", OPERATOR_NS, "--values", str(LOCAL_VALUES),
        "--set", f"operator.namespaces={{{TEAM},{STRICT}}}", *port_values(), "--wait", "--timeout", "2m",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    wait_for_webhook(stack, TEAM)
    return stack


def wait_for_webhook(stack: Stack, namespace: str) -> None:
    """FineTuneJobs can be created once the API server reaches the webhook (failurePolicy Fail):
    after the operator pod is ready and the Service's endpoints list it."""

    def admitted() -> bool:
        body = yaml.safe_load(EXAMPLE_JOB.read_text().replace("${S3_ENDPOINT}", stack.info.s3_endpoint))
        try:
            custom(stack).create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, body, dry_run="All"
            )
        except ApiException as exc:
            if "failed calling webhook" in str(exc.body):
                return False
            raise
        return True

    wait_for(admitted, 60, "the admission webhook to answer")


# ---------------------------------------------------------------------------------------------
# Reading the cluster


def operator_pods(stack: Stack, namespace: str = OPERATOR_NS, release: str = RELEASE) -> list[Any]:
    selector = f"app.kubernetes.io/instance={release}"
    return list(stack.core.list_namespaced_pod(namespace, label_selector=selector).items)


def running_operator(stack: Stack, namespace: str = OPERATOR_NS, release: str = RELEASE) -> Any:
    """The one operator pod, once it is Running and its process has logged its start."""

    def probe() -> Any:
        pods = [p for p in operator_pods(stack, namespace, release) if not p.metadata.deletion_timestamp]
        if len(pods) == 1 and pods[0].status.phase == "Running":
            log = pod_log(stack.info.run_dir, namespace, pods[0].metadata.name)
            return pods[0] if "finetune-operator starting" in log else None
        return None

    def describe() -> Any:
        pods = operator_pods(stack, namespace, release)
        return [(p.metadata.name, p.status.phase) for p in pods] + [
            pod_log(stack.info.run_dir, namespace, p.metadata.name)[-2000:] for p in pods
        ]

    return wait_for(probe, 90, f"the operator pod of {release} in {namespace}", describe=describe)


def pod_kubectl(stack: Stack, pod: Any, tmp: Path) -> list[str]:
    """kubectl authenticated with the token the node agent mounted into `pod`, as the pod's
    in-cluster client sees it."""
    root = Path(stack.info.run_dir) / "pods"
    mounted = sorted(root.glob(f"{pod.metadata.namespace}_{pod.metadata.name}_*/volumes/kube-api-access-*"))
    assert mounted, f"no service-account token mounted for {pod.metadata.name}"
    kubeconfig = tmp / f"{pod.metadata.name}.kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "local",
                        "cluster": {
                            "server": stack.info.apiserver_url,
                            "certificate-authority": str(mounted[0] / "ca.crt"),
                        },
                    }
                ],
                "users": [{"name": "pod", "user": {"tokenFile": str(mounted[0] / "token")}}],
                "contexts": [{"name": "pod", "context": {"cluster": "local", "user": "pod"}}],
                "current-context": "pod",
            }
        )
    )
    return [str(tool("kubectl")), "--kubeconfig", str(kubeconfig)]


def custom(stack: Stack) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(stack.api)


def get_job_resource(stack: Stack, namespace: str, name: str) -> dict[str, Any]:
    return custom(stack).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)  # type: ignore[no-any-return]


def create_example_job(stack: Stack, namespace: str, name: str, suspend: bool = False) -> dict[str, Any]:
    """examples/quickstart.yaml, pointed at the cluster's S3 server."""
    body = yaml.safe_load(EXAMPLE_JOB.read_text().replace("${S3_ENDPOINT}", stack.info.s3_endpoint))
    body["metadata"]["name"] = name
    body["spec"]["suspend"] = suspend
    return custom(stack).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)  # type: ignore[no-any-return]


def suspend_job_resource(stack: Stack, namespace: str, name: str) -> None:
    # Stops the trainer's retries so they do not compete with the next tests for CPU.
    patch = {"spec": {"suspend": True}}
    custom(stack).patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)


def training_job(stack: Stack, namespace: str, name: str) -> Any:
    try:
        return client.BatchV1Api(stack.api).read_namespaced_job(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def wait_for_training_job(stack: Stack, namespace: str, name: str) -> Any:
    return wait_for(
        lambda: training_job(stack, namespace, name),
        60,
        f"the training Job of {namespace}/{name}",
        describe=lambda: (
            get_job_resource(stack, namespace, name).get("status"),
            events_for(stack.core, namespace, name),
        ),
    )


def job_pods(stack: Stack, namespace: str, job: str) -> list[Any]:
    selector = f"batch.kubernetes.io/job-name={job}"
    return list(stack.core.list_namespaced_pod(namespace, label_selector=selector).items)


def started(pod: Any) -> bool:
    """Bound to a node and its container started (it may already have ended)."""
    statuses = pod.status.container_statuses or []
    return bool(pod.spec.node_name) and any(s.state.running or s.state.terminated for s in statuses)


# ---------------------------------------------------------------------------------------------
# Values


def test_wrong_type_in_values_file_is_refused_by_install(stack: Stack, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"operator": {"gpuMemoryGiB": "lots"}}))
    result = stack.helm("install", "bad", str(CHART), "--namespace", "default", "--values", str(values))
    assert result.returncode != 0
    assert "/operator/gpuMemoryGiB" in result.stderr, result.stderr
    assert stack.helm("list", "--all-namespaces", "--short").stdout.split() == []
    deployments = client.AppsV1Api(stack.api).list_deployment_for_all_namespaces().items
    assert not deployments, [d.metadata.name for d in deployments]


# ---------------------------------------------------------------------------------------------
# Namespaced mode


def test_operator_pod_runs_under_the_chart_service_account(namespaced: Stack, tmp_path: Path) -> None:
    pod = running_operator(namespaced)
    assert pod.spec.service_account_name == OPERATOR
    assert namespaced.core.read_namespaced_service_account(OPERATOR, OPERATOR_NS)
    # Its namespace enforces Pod Security "restricted", so this pod passed that admission. (runAsUser
    # and readOnlyRootFilesystem are not enforced by the node agent: processes run as the current user.)

    # The pod's own token: the API server knows it as the chart's ServiceAccount.
    whoami = _run(
        *pod_kubectl(namespaced, pod, tmp_path),
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    )
    assert whoami.stdout == f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR}", whoami.stderr

    log = pod_log(namespaced.info.run_dir, OPERATOR_NS, pod.metadata.name)
    assert f"namespaces={TEAM},{STRICT}" in log


@pytest.mark.parametrize(
    ("verb", "resource", "namespace", "allowed"),
    [
        # Secrets: get by name in handled namespaces, never list or watch, nothing elsewhere.
        ("get", "secrets", TEAM, True),
        ("list", "secrets", TEAM, False),
        ("watch", "secrets", TEAM, False),
        ("create", "secrets", TEAM, False),
        ("get", "secrets", OTHER, False),
        # What reconciling takes, in handled namespaces only.
        ("watch", "finetunejobs.finetune.dev", STRICT, True),
        ("patch", "finetunejobs.finetune.dev/status", TEAM, True),
        ("patch", "finetunejobs.finetune.dev/status", OTHER, False),
        ("list", "finetunejobs.finetune.dev", None, False),
        ("create", "jobs.batch", TEAM, True),
        ("create", "jobs.batch", OTHER, False),
        ("watch", "pods", TEAM, True),
        ("watch", "pods", OTHER, False),
        ("watch", "configmaps", STRICT, True),
        ("create", "roles.rbac.authorization.k8s.io", TEAM, True),
        ("create", "events", TEAM, True),
        ("list", "nodes", None, True),
        # Beyond its rules.
        ("delete", "pods", TEAM, False),
        ("create", "pods", TEAM, False),
        ("create", "deployments.apps", TEAM, False),
        ("escalate", "roles.rbac.authorization.k8s.io", TEAM, False),
        ("bind", "clusterroles.rbac.authorization.k8s.io", None, False),
        ("delete", "nodes", None, False),
        ("create", "namespaces", None, False),
    ],
)
def test_operator_token_is_held_to_its_rbac(
    namespaced: Stack, tmp_path: Path, verb: str, resource: str, namespace: str | None, allowed: bool
) -> None:
    kubectl = pod_kubectl(namespaced, running_operator(namespaced), tmp_path)
    resource, _, subresource = resource.partition("/")
    scope = ["--namespace", namespace] if namespace else ["--all-namespaces"]
    extra = [f"--subresource={subresource}"] if subresource else []
    result = _run(*kubectl, "auth", "can-i", verb, resource, *scope, *extra)
    assert result.stdout.strip() == ("yes" if allowed else "no"), result.stdout + result.stderr


def test_operator_token_is_refused_listing_secrets(namespaced: Stack, tmp_path: Path) -> None:
    kubectl = pod_kubectl(namespaced, running_operator(namespaced), tmp_path)
    result = _run(*kubectl, "--namespace", TEAM, "get", "secrets")
    assert result.returncode != 0
    assert "Forbidden" in result.stderr and "cannot list resource" in result.stderr, result.stderr


def test_operator_reconciles_the_example_to_a_running_training_job(namespaced: Stack) -> None:
    stack = namespaced
    # Created first, in a namespace the release does not handle: it must stay untouched.
    create_example_job(stack, OTHER, "elsewhere", suspend=True)
    owner = create_example_job(stack, TEAM, "quickstart")

    job = wait_for_training_job(stack, TEAM, "quickstart")
    refs = job.metadata.owner_references
    assert [(r.kind, r.name, r.uid, r.controller) for r in refs] == [
        ("FineTuneJob", "quickstart", owner["metadata"]["uid"], True)
    ]
    assert not job.spec.suspend

    pod = wait_for(
        lambda: next((p for p in job_pods(stack, TEAM, "quickstart") if started(p)), None),
        60,
        "a started trainer pod",
        describe=lambda: (job_pods(stack, TEAM, "quickstart"), events_for(stack.core, TEAM, "quickstart")),
    )
    assert pod.spec.node_name == stack.info.node_name
    # The operator created the trainer's ServiceAccount; the pod runs under it, not `default`.
    assert pod.spec.service_account_name != "default"
    assert stack.core.read_namespaced_service_account(pod.spec.service_account_name, TEAM)
    wait_for(
        lambda: "finetune_trainer" in pod_log(stack.info.run_dir, TEAM, pod.metadata.name),
        90,
        "the trainer's log",
        describe=lambda: pod_log(stack.info.run_dir, TEAM, pod.metadata.name)[-2000:],
    )
    wait_for(
        lambda: (get_job_resource(stack, TEAM, "quickstart").get("status") or {}).get("phase"),
        30,
        "the operator to report status.phase",
    )

    assert training_job(stack, OTHER, "elsewhere") is None
    assert not get_job_resource(stack, OTHER, "elsewhere").get("status")
    operator_log = pod_log(stack.info.run_dir, OPERATOR_NS, running_operator(stack).metadata.name)
    assert "forbidden" not in operator_log.lower()
    suspend_job_resource(stack, TEAM, "quickstart")


def test_the_webhook_records_the_creating_user(namespaced: Stack, tmp_path: Path) -> None:
    """USER_ID comes from the API server's authentication of the creating request (here alice, by
    impersonation), not from the manifest; a manifest naming someone else is refused."""
    stack = namespaced
    bound = stack.kubectl("create", "rolebinding", "alice", "--clusterrole=edit", "--user=alice", "-n", TEAM)
    assert bound.returncode == 0, bound.stderr
    can_create = ("auth", "can-i", "create", "finetunejobs.finetune.dev", "-n", TEAM, "--as", "alice")
    # The chart's aggregated ClusterRole puts FineTuneJobs into `edit`.
    wait_for(lambda: stack.kubectl(*can_create).stdout.strip() == "yes", 30, "edit to cover FineTuneJobs")

    created = create_as_alice(stack, tmp_path, "alices")
    assert created.returncode == 0, created.stderr
    assert "spec.userId recorded as 'alice'" in created.stderr  # kubectl shows admission warnings
    assert get_job_resource(stack, TEAM, "alices")["spec"]["userId"] == "alice"
    container = wait_for_training_job(stack, TEAM, "alices").spec.template.spec.containers[0]
    assert {e.name: e.value for e in container.env}["USER_ID"] == "alice"

    refused = create_as_alice(stack, tmp_path, "forged", userId="mallory")
    assert refused.returncode != 0, refused.stdout
    assert "spec.userId: got 'mallory', but this request comes from 'alice'" in refused.stderr, refused.stderr
    with pytest.raises(ApiException) as missing:
        get_job_resource(stack, TEAM, "forged")
    assert missing.value.status == 404
    custom(stack).delete_namespaced_custom_object(GROUP, VERSION, TEAM, PLURAL, "alices")


def test_an_edit_of_a_launched_job_is_refused_at_apply_time(namespaced: Stack) -> None:
    stack = namespaced
    create_example_job(stack, TEAM, "launched", suspend=True)
    wait_for_training_job(stack, TEAM, "launched")
    launch = wait_for(
        lambda: (get_job_resource(stack, TEAM, "launched").get("status") or {}).get("launchTime"),
        30,
        "status.launchTime",
    )
    rate = get_job_resource(stack, TEAM, "launched")["spec"]["hyperparameters"]["learningRate"]

    def patch(body: dict[str, Any]) -> None:
        custom(stack).patch_namespaced_custom_object(GROUP, VERSION, TEAM, PLURAL, "launched", body)

    with pytest.raises(ApiException) as refused:
        patch({"spec": {"hyperparameters": {"learningRate": rate * 10}}})
    message = json.loads(refused.value.body)["message"]
    assert refused.value.status == 422, message
    assert "launched-spec.finetune.dev" in message and "denied the request" in message
    assert "spec.hyperparameters.learningRate cannot change" in message
    assert "only spec.suspend may change once launched; fix:" in message
    assert get_job_resource(stack, TEAM, "launched")["spec"]["hyperparameters"]["learningRate"] == rate
    # What may change still does: labels (the operator's own writes are like these) and suspend.
    patch({"metadata": {"labels": {"team": "a"}}})
    patch({"spec": {"suspend": False}})
    patch({"spec": {"suspend": True}})
    assert get_job_resource(stack, TEAM, "launched")["status"]["launchTime"] == launch
    custom(stack).delete_namespaced_custom_object(GROUP, VERSION, TEAM, PLURAL, "launched")


def create_as_alice(stack: Stack, tmp_path: Path, name: str, **spec: Any) -> subprocess.CompletedProcess[str]:
    body = yaml.safe_load(EXAMPLE_JOB.read_text().replace("${S3_ENDPOINT}", stack.info.s3_endpoint))
    manifest = tmp_path / f"{name}.yaml"
    changes = {"metadata": {"name": name}, "spec": {"suspend": True, **spec}}
    manifest.write_text(yaml.safe_dump(deep_merge(body, changes)))
    return stack.kubectl("create", "-f", str(manifest), "-n", TEAM, "--as", "alice")


def test_restricted_namespace_admits_the_trainer_pods(namespaced: Stack) -> None:
    stack = namespaced
    # Pod Security admission is on and enforces the label: a plain pod is refused.
    with pytest.raises(ApiException) as refused:
        stack.core.create_namespaced_pod(
            STRICT,
            {
                "metadata": {"name": "plain"},
                "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["true"]}]},
            },
        )
    assert refused.value.status == 403 and "violates PodSecurity" in refused.value.body

    create_example_job(stack, STRICT, "strict")
    wait_for_training_job(stack, STRICT, "strict")
    pods = wait_for(
        lambda: job_pods(stack, STRICT, "strict"),
        60,
        "the trainer pod in the restricted namespace",
        describe=lambda: events_for(stack.core, STRICT, "strict"),
    )
    assert pods
    refusals = [e for e in events_for(stack.core, STRICT, "strict") if e.startswith("FailedCreate")]
    assert not refusals
    suspend_job_resource(stack, STRICT, "strict")


def logged_at(log: str, phrase: str) -> datetime:
    """When the operator logged a line containing `phrase` (its log lines start with the time)."""
    for line in log.splitlines():
        if phrase in line:
            return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
    raise AssertionError(f"no {phrase!r} in the log: {log[-1500:]}")


def test_upgrade_hands_the_lease_from_the_old_pod_to_the_new(namespaced: Stack) -> None:
    stack = namespaced
    old = running_operator(stack)
    assert _env(old)["FINETUNE_OPERATOR_LOG_LEVEL"] == "INFO"

    # A rolling update: the new pod starts while the old one still acts, and waits for the Lease.
    result = stack.helm(
        "upgrade", RELEASE, str(CHART), "--namespace", OPERATOR_NS, "--reuse-values",
        "--set", "operator.logLevel=DEBUG", *port_values(), "--wait", "--timeout", "2m",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    new = running_operator(stack)

    assert new.metadata.uid != old.metadata.uid
    assert _env(new)["FINETUNE_OPERATOR_LOG_LEVEL"] == "DEBUG"
    new_log = pod_log(stack.info.run_dir, OPERATOR_NS, new.metadata.name)
    old_log = pod_log(stack.info.run_dir, OPERATOR_NS, old.metadata.name)
    assert "log_level=DEBUG" in new_log
    waiting = logged_at(new_log, "waiting for the lease")
    released = logged_at(old_log, "released the lease")
    acquired = logged_at(new_log, "acquired the lease")
    # The premise: both ran at once. Yet the new one acted only after the old one let go, and at
    # once (handed over on its way out, not left to expire).
    assert waiting < released <= acquired, (waiting, released, acquired)
    assert (acquired - released).total_seconds() < 5


def _env(pod: Any) -> dict[str, str]:
    return {e.name: e.value for e in pod.spec.containers[0].env or []}


def test_uninstall_removes_everything_but_the_crd_and_the_jobs(namespaced: Stack) -> None:
    stack = namespaced

    def release_objects() -> list[str]:
        found: list[str] = []
        for args in (
            [RELEASE_KINDS, "--all-namespaces"],
            [
                "clusterroles,clusterrolebindings,mutatingwebhookconfigurations,validatingwebhookconfigurations"
            ],
        ):
            result = stack.kubectl("get", *args, "-l", RELEASE_SELECTOR, "-o", "name")
            assert result.returncode == 0, result.stderr
            found += result.stdout.split()
        return sorted(found)

    installed = {name.split("/")[0].split(".")[0] for name in release_objects()}
    assert installed >= {
        "deployment",
        "serviceaccount",
        "service",
        "configmap",
        "role",
        "rolebinding",
        "clusterrole",
        "clusterrolebinding",
        "secret",
        "mutatingwebhookconfiguration",
        "validatingwebhookconfiguration",
    }

    result = stack.helm("uninstall", RELEASE, "--namespace", OPERATOR_NS, "--wait", "--timeout", "2m")
    assert result.returncode == 0, result.stderr
    # The dashboard ConfigMap and the rest are gone; so, shortly after, is the operator pod.
    assert release_objects() == []
    wait_for(
        lambda: not operator_pods(stack), 60, "the operator pod to go", describe=lambda: operator_pods(stack)
    )

    crd = client.ApiextensionsV1Api(stack.api).read_custom_resource_definition(CRD_NAME)
    assert not crd.metadata.deletion_timestamp
    assert get_job_resource(stack, TEAM, "quickstart")["status"]["phase"]

    # FineTuneJobs carry no finalizer: with the operator gone they can still be deleted.
    assert not get_job_resource(stack, TEAM, "quickstart")["metadata"].get("finalizers")
    custom(stack).delete_namespaced_custom_object(GROUP, VERSION, TEAM, PLURAL, "quickstart")
    wait_for(
        lambda: not custom(stack).list_namespaced_custom_object(GROUP, VERSION, TEAM, PLURAL)["items"],
        30,
        "the job to be deleted",
    )


# ---------------------------------------------------------------------------------------------
# Cluster-wide mode


def test_cluster_wide_install_handles_jobs_in_any_namespace(stack: Stack, tmp_path: Path) -> None:
    # One operator per cluster: the namespaced release of the tests above goes first.
    result = stack.helm("uninstall", RELEASE, "--namespace", OPERATOR_NS, "--ignore-not-found", "--wait")
    assert result.returncode == 0, result.stderr
    release, namespace, anywhere = "wide", "finetune-wide", "anywhere"
    create_namespace(stack, namespace)
    create_namespace(stack, anywhere)
    create_secrets(stack, anywhere)
    result = stack.helm(
        "install", release, str(CHART), "--namespace", namespace, "--values", str(LOCAL_VALUES),
        *port_values(), "--wait", "--timeout", "2m",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    name = f"{release}-finetune-operator"
    rbac = client.RbacAuthorizationV1Api(stack.api)
    binding = rbac.read_cluster_role_binding(name)
    assert binding.role_ref.name == name
    assert [(s.name, s.namespace) for s in binding.subjects] == [(name, namespace)]
    # Namespaced bindings: only the leader-election Lease's, in the release namespace.
    bindings = rbac.list_role_binding_for_all_namespaces(
        label_selector=f"app.kubernetes.io/instance={release}"
    )
    assert [(b.metadata.namespace, b.metadata.name) for b in bindings.items] == [
        (namespace, f"{name}-leader")
    ]

    pod = running_operator(stack, namespace, release)
    kubectl = pod_kubectl(stack, pod, tmp_path)
    for verb, resource, answer in [
        ("create", "jobs.batch", "yes"),
        ("get", "secrets", "yes"),
        ("list", "secrets", "no"),
    ]:
        result = _run(*kubectl, "auth", "can-i", verb, resource, "--namespace", anywhere)
        assert result.stdout.strip() == answer, (verb, resource, result.stdout, result.stderr)

    # A suspended job: the Job is created without starting a pod.
    wait_for_webhook(stack, anywhere)
    create_example_job(stack, anywhere, "anywhere", suspend=True)
    job = wait_for_training_job(stack, anywhere, "anywhere")
    assert job.metadata.owner_references[0].kind == "FineTuneJob"
    assert job.spec.suspend is True
    assert "forbidden" not in pod_log(stack.info.run_dir, namespace, pod.metadata.name).lower()
