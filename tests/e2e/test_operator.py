"""The operator on a real control plane: the checklist enforced at apply time and before launch,
children created and owned, status and events a user can read, and secrets never leaked."""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from localcluster import ClusterInfo
from localcluster.testing import events_for, wait_for
from localcluster.tools import tool

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
CANARY = "canary-3c9d1e-never-print-me"


def ftj(name: str, **spec_changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "goal": {"task": "answer support tickets", "metrics": ["exact_match"]},
        "model": {"source": "s3://models/tiny", "parameters": "5M"},
        "dataset": {"source": "s3://data/tickets.jsonl", "format": "alpaca"},
        "method": {"type": "lora"},
        "checkpoints": {"store": {"bucket": "ckpt", "credentialsSecret": "s3-creds"}},
        "env": [{"name": "SUPABASE_SERVICE_ROLE_KEY", "secretKeyRef": {"name": "persistence", "key": "key"}}],
        "suspend": True,
    }
    spec.update(copy.deepcopy(spec_changes))
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def custom(kube: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube)


def get_ftj(kube: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return custom(kube).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)  # type: ignore[no-any-return]


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return cond  # type: ignore[no-any-return]
    return None


def make_secrets(core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "s3-creds"}, "stringData": {"accessKeyId": "id", "secretAccessKey": CANARY}},
    )
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "persistence"}, "stringData": {"key": CANARY}}
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"method": {"type": "qlora", "deepspeed": {"stage": 2}}}, "deepspeed"),
        ({"method": {"type": "lora"}, "resources": {"nodes": 2}}, "nodes"),
        ({"env": [{"name": "SUPABASE_SERVICE_ROLE_KEY", "value": "plain"}]}, "secretKeyRef"),
        ({"hyperparameters": {"learningRate": -1}}, "learningRate"),
        ({"dataset": {"source": "s3://d/x.jsonl", "format": "yaml"}}, "format"),
    ],
)
def test_bad_specs_are_refused_at_apply_time_naming_the_field(
    kube: client.ApiClient, crd: None, namespace: str, change: dict[str, Any], field: str
) -> None:
    with pytest.raises(ApiException) as exc:
        custom(kube).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, ftj("bad", **change))
    assert exc.value.status == 422
    assert field in exc.value.body


def test_kubectl_explain_teaches_the_method_field(cluster: ClusterInfo, crd: None) -> None:
    def explain() -> str:
        # The API server publishes a new CRD's OpenAPI a few seconds after it is Established.
        result = subprocess.run(
            [str(tool("kubectl")), "--kubeconfig", cluster.kubeconfig, "explain", "ftj.spec.method"],
            capture_output=True,
            text=True,
        )
        return result.stdout if result.returncode == 0 else ""

    out = wait_for(explain, 60, "kubectl explain ftj.spec.method")
    assert "FIELD: method" in out
    assert "qlora" in out.lower()


def test_missing_secret_blocks_launch_until_created(
    kube: client.ApiClient, core: client.CoreV1Api, operator: Any, namespace: str
) -> None:
    custom(kube).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, ftj("needs-secrets"))

    def secrets_not_ready() -> dict[str, Any] | None:
        cond = condition(get_ftj(kube, namespace, "needs-secrets"), "SecretsReady")
        return cond if cond and cond["status"] == "False" else None

    cond = wait_for(secrets_not_ready, 30, "SecretsReady=False")
    assert "s3-creds" in cond["message"] and "persistence" in cond["message"]
    assert not client.BatchV1Api(kube).list_namespaced_job(namespace).items

    make_secrets(core, namespace)
    wait_for(
        lambda: client.BatchV1Api(kube).list_namespaced_job(namespace).items,
        120,
        "the training Job once the secrets exist",
    )
    ready = wait_for(
        lambda: (
            (c := condition(get_ftj(kube, namespace, "needs-secrets"), "SecretsReady"))
            and c["status"] == "True"
            and c
        ),
        30,
        "SecretsReady=True",
    )
    assert CANARY not in json.dumps(ready)


def launch_suspended(kube: client.ApiClient, namespace: str, name: str) -> Any:
    """Creates `ftj(name)` (suspended: no pods) and returns its training Job once it exists."""
    custom(kube).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, ftj(name))
    batch = client.BatchV1Api(kube)
    return wait_for(lambda: batch.list_namespaced_job(namespace).items, 60, f"the Job of {name}")[0]


def test_children_are_owned_labelled_and_collected(
    kube: client.ApiClient, core: client.CoreV1Api, operator: Any, cluster: ClusterInfo, namespace: str
) -> None:
    make_secrets(core, namespace)
    batch = client.BatchV1Api(kube)
    job = launch_suspended(kube, namespace, "support-bot")
    assert job.spec.suspend is True
    assert job.metadata.owner_references[0].kind == "FineTuneJob"
    pod_spec = job.spec.template.spec
    assert pod_spec.security_context.run_as_non_root is True
    env = {e.name: e for e in pod_spec.containers[0].env}
    assert env["SUPABASE_SERVICE_ROLE_KEY"].value_from.secret_key_ref.name == "persistence"
    assert env["JOB_ID"].value == get_ftj(kube, namespace, "support-bot")["metadata"]["uid"]

    status = wait_for(
        lambda: get_ftj(kube, namespace, "support-bot").get("status", {}).get("method"), 30, "status.method"
    )
    assert status["type"] == "lora"
    assert any(e.startswith("MethodChosen") for e in events_for(core, namespace, "support-bot"))
    table = subprocess.run(
        [str(tool("kubectl")), "--kubeconfig", cluster.kubeconfig, "-n", namespace, "get", "ftj"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "support-bot" in table and "lora" in table

    custom(kube).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "support-bot")
    wait_for(
        lambda: (
            not batch.list_namespaced_job(namespace).items
            and not [
                c
                for c in core.list_namespaced_config_map(namespace).items
                if c.metadata.name.startswith("support-bot")
            ]
        ),
        60,
        "children to be garbage-collected",
    )


def test_a_launched_job_keeps_its_spec_and_names_the_edit(
    kube: client.ApiClient, core: client.CoreV1Api, operator: Any, namespace: str
) -> None:
    """After launch only spec.suspend may change: an edit is named in a condition and an event, and
    neither the trainer's config nor the Job changes; a deleted Secret is reported, not re-checked
    as if the job had not launched."""
    make_secrets(core, namespace)
    job = launch_suspended(kube, namespace, "locked")
    config = core.read_namespaced_config_map("locked-config", namespace).data
    api = custom(kube)

    def spec_applied(expected: str) -> Any:
        def check() -> dict[str, Any] | None:
            obj = get_ftj(kube, namespace, "locked")
            cond = condition(obj, "SpecApplied")
            generation = obj["metadata"]["generation"]
            done = (
                cond and cond["status"] == expected and obj["status"].get("observedGeneration") == generation
            )
            return obj if done else None

        return wait_for(check, 30, f"SpecApplied={expected} for the latest generation")

    core.delete_namespaced_secret("persistence", namespace)
    api.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "locked", {"spec": {"hyperparameters": {"learningRate": 0.001}}}
    )
    obj = spec_applied("False")
    message = condition(obj, "SpecApplied")["message"]  # type: ignore[index]
    assert "spec.hyperparameters.learningRate changed after the job launched" in message
    assert "only spec.suspend may change" in message
    assert core.read_namespaced_config_map("locked-config", namespace).data == config
    assert client.BatchV1Api(kube).read_namespaced_job("locked", namespace).metadata.uid == job.metadata.uid
    assert obj["status"]["phase"] == "Suspended", "a launched job is not preflighted again"
    assert any(e.startswith("SpecChangeIgnored") for e in events_for(core, namespace, "locked"))

    missing = wait_for(
        lambda: (
            (c := condition(get_ftj(kube, namespace, "locked"), "SecretsReady"))
            and c["status"] == "False"
            and c
        ),
        45,
        "SecretsReady=False for the deleted Secret",
    )
    assert "persistence" in missing["message"] and "deleted after the job launched" in missing["message"]

    api.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "locked", {"spec": {"hyperparameters": {"learningRate": None}}}
    )
    spec_applied("True")


def test_children_deleted_under_a_launched_job_come_back_as_they_were(
    kube: client.ApiClient, core: client.CoreV1Api, operator: Any, namespace: str
) -> None:
    """A pod of the Job needs its ServiceAccount and ConfigMaps to start: deleted by hand (or by the
    garbage collector after a quick delete and re-create), they are made again, unchanged."""
    make_secrets(core, namespace)
    launch_suspended(kube, namespace, "mended")
    uid = get_ftj(kube, namespace, "mended")["metadata"]["uid"]
    networking = client.NetworkingV1Api(kube)
    config = core.read_namespaced_config_map("mended-config", namespace)
    sa = core.read_namespaced_service_account("mended-trainer", namespace)
    policy_ = networking.read_namespaced_network_policy("mended-trainer", namespace)
    core.delete_namespaced_config_map("mended-config", namespace)
    core.delete_namespaced_service_account("mended-trainer", namespace)
    networking.delete_namespaced_network_policy("mended-trainer", namespace)

    def back(read: Callable[[], Any], old_uid: str) -> Any:
        def check() -> Any:
            try:
                found = read()
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            return found if found.metadata.uid != old_uid else None

        return wait_for(check, 75, "the deleted child to be re-created")  # within two refresh passes

    new_config = back(
        lambda: core.read_namespaced_config_map("mended-config", namespace), config.metadata.uid
    )
    assert new_config.data == config.data, "the config the Job's pods read, not a new rendering"
    assert new_config.metadata.owner_references[0].uid == uid
    back(lambda: core.read_namespaced_service_account("mended-trainer", namespace), sa.metadata.uid)
    back(lambda: networking.read_namespaced_network_policy("mended-trainer", namespace), policy_.metadata.uid)
    events = events_for(core, namespace, "mended")
    assert any(e.startswith("ChildRestored") and "ServiceAccount mended-trainer" in e for e in events), events


def test_a_pod_the_cluster_refuses_shows_in_status_with_the_reason(
    kube: client.ApiClient, core: client.CoreV1Api, operator: Any, namespace: str
) -> None:
    """A quota (or a missing ServiceAccount, an admission policy) that stops the Job controller from
    creating the trainer pod is in the job's status, in the controller's own words."""
    make_secrets(core, namespace)
    quota = {"metadata": {"name": "small"}, "spec": {"hard": {"requests.cpu": "1"}}}
    core.create_namespaced_resource_quota(namespace, quota)
    wait_for(
        lambda: core.read_namespaced_resource_quota("small", namespace).status.hard or None,
        30,
        "the quota to be counted",
    )
    custom(kube).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, ftj("quota", suspend=False)
    )

    def refused() -> dict[str, Any] | None:
        obj = get_ftj(kube, namespace, "quota")
        cond = condition(obj, "PodsCreated")
        return obj if cond and cond["status"] == "False" else None

    obj = wait_for(refused, 90, "PodsCreated=False")
    message = condition(obj, "PodsCreated")["message"]  # type: ignore[index]
    assert "exceeded quota: small" in message and "requests.cpu=2" in message, message
    assert obj["status"]["phase"] == "Pending" and obj["status"]["message"] == message
    assert not core.list_namespaced_pod(namespace).items, "premise: no pod was created"


def test_a_spec_at_the_schemas_largest_sizes_reconciles(
    kube: client.ApiClient, core: client.CoreV1Api, operator: Any, namespace: str
) -> None:
    """About 1 MB of prompts, scenarios and env: more than the 256 KiB all annotations share, so the
    operator's record of the last handled spec must not be the spec itself."""
    make_secrets(core, namespace)
    text = "Which group do these words belong to? " + "word " * 812  # 4096 characters, the most
    assert len(text[:4096]) == 4096
    big = ftj(
        "largest",
        validation={
            "prompts": [text[:4096]] * 32,
            "heldOutScenarios": [{"prompt": text[:4096], "expect": text[:4096]}] * 64,
        },
        env=[
            {"name": "SUPABASE_SERVICE_ROLE_KEY", "secretKeyRef": {"name": "persistence", "key": "key"}},
            *({"name": f"EXTRA_SETTING_{i}", "value": "x" * 4096} for i in range(63)),
        ],
    )
    assert len(json.dumps(big["spec"])) > 800_000, "premise: far above the annotations' 256 KiB"
    custom(kube).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, big)
    wait_for(lambda: client.BatchV1Api(kube).list_namespaced_job(namespace).items, 60, "the Job of largest")
    handled = "finetune.dev/last-handled-configuration"
    obj = wait_for(
        lambda: (
            (o := get_ftj(kube, namespace, "largest"))["metadata"].get("annotations", {}).get(handled) and o
        ),
        30,
        "the operator to record the spec as handled",
    )
    annotations = obj["metadata"]["annotations"]
    assert sum(len(k) + len(v) for k, v in annotations.items()) < 16_384, sorted(annotations)
    custom(kube).patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "largest",
        {"spec": {"validation": {"prompts": [text[:4096]] * 31}}},
    )
    changed = wait_for(
        lambda: (
            (c := condition(get_ftj(kube, namespace, "largest"), "SpecApplied"))
            and c["status"] == "False"
            and c
        ),
        30,
        "the edit to be handled",
    )
    assert "spec.validation.prompts changed" in changed["message"]


HOLD = "finetune.dev/test-hold"  # keeps a deleted job's Job around, as a slow garbage collector would


def test_a_recreated_job_never_adopts_the_deleted_jobs_children(
    kube: client.ApiClient, core: client.CoreV1Api, operator: Any, namespace: str
) -> None:
    make_secrets(core, namespace)
    api, batch = custom(kube), client.BatchV1Api(kube)
    launch_suspended(kube, namespace, "again")
    old_uid = get_ftj(kube, namespace, "again")["metadata"]["uid"]
    batch.patch_namespaced_job("again", namespace, {"metadata": {"finalizers": [HOLD]}})
    api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "again")
    wait_for(
        lambda: not api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"],
        60,
        "the first FineTuneJob to be gone",
    )
    held = wait_for(
        lambda: (j := batch.read_namespaced_job("again", namespace)).metadata.deletion_timestamp and j,
        60,
        "the garbage collector to start deleting the old Job",
    )
    assert held.metadata.owner_references[0].uid == old_uid  # the premise: a dead job's Job is there

    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, ftj("again"))
    new_uid = get_ftj(kube, namespace, "again")["metadata"]["uid"]
    assert new_uid != old_uid
    waiting = wait_for(
        lambda: (
            "waiting for Job again"
            in ((s := get_ftj(kube, namespace, "again").get("status") or {}).get("message") or "")
            and s
        ),
        60,
        "the new job to wait for the old Job",
    )
    assert waiting["phase"] == "Pending" and old_uid in waiting["message"], waiting

    batch.patch_namespaced_job("again", namespace, {"metadata": {"finalizers": None}})
    job = wait_for(
        lambda: next(
            (
                j
                for j in batch.list_namespaced_job(namespace).items
                if j.metadata.owner_references[0].uid == new_uid
            ),
            None,
        ),
        60,
        "the new job's own Job",
    )
    assert job.spec.suspend is True
    status = wait_for(
        lambda: (
            (s := get_ftj(kube, namespace, "again").get("status") or {}).get("phase") == "Suspended" and s
        ),
        60,
        "phase Suspended",
    )
    assert "waiting for" not in (status.get("message") or "")


def test_names_that_share_child_names_are_refused_naming_the_other_job(
    kube: client.ApiClient, core: client.CoreV1Api, operator: Any, namespace: str
) -> None:
    make_secrets(core, namespace)
    api, batch = custom(kube), client.BatchV1Api(kube)
    first = launch_suspended(kube, namespace, "team.bot")
    assert first.metadata.name == "team-bot"  # the premise: both names make the same child names

    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, ftj("team-bot"))
    status = wait_for(
        lambda: (
            (s := get_ftj(kube, namespace, "team-bot").get("status") or {}).get("phase") == "Failed" and s
        ),
        60,
        "the second job to be refused",
    )
    assert "metadata.name 'team-bot'" in status["message"] and "'team.bot' already uses" in status["message"]
    assert "fix: rename this job" in status["message"]
    jobs = batch.list_namespaced_job(namespace).items
    assert [j.metadata.owner_references[0].uid for j in jobs] == [first.metadata.owner_references[0].uid]
    assert get_ftj(kube, namespace, "team.bot")["status"]["phase"] == "Suspended"


def test_refused_full_fine_tune_on_tiny_declared_data(
    kube: client.ApiClient, core: client.CoreV1Api, operator: Any, namespace: str
) -> None:
    make_secrets(core, namespace)
    spec = ftj(
        "tiny-full",
        method={"type": "full"},
        dataset={"source": "s3://d/x.jsonl", "format": "alpaca", "expectedExamples": 300},
    )
    custom(kube).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, spec)
    obj = wait_for(
        lambda: (o := get_ftj(kube, namespace, "tiny-full")).get("status", {}).get("phase") == "Failed" and o,
        30,
        "the job to be refused",
    )
    assert "300" in obj["status"]["message"]
    assert "lora" in obj["status"]["message"].lower()
    assert not client.BatchV1Api(kube).list_namespaced_job(namespace).items


def test_no_secret_value_in_status_events_or_operator_log(
    kube: client.ApiClient, core: client.CoreV1Api, operator: Any, namespace: str
) -> None:
    make_secrets(core, namespace)
    custom(kube).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, ftj("quiet"))
    wait_for(lambda: client.BatchV1Api(kube).list_namespaced_job(namespace).items, 60, "the training Job")
    obj = get_ftj(kube, namespace, "quiet")
    events = core.list_namespaced_event(namespace).items
    config = core.list_namespaced_config_map(namespace).items
    assert CANARY not in json.dumps(obj)
    assert CANARY not in " ".join(f"{e.reason} {e.message}" for e in events)
    assert CANARY not in json.dumps([c.data for c in config])
    assert CANARY not in operator.log_text()


def test_liveness_endpoint_reports_the_refresh_age(operator: Any) -> None:
    import urllib.request

    def healthy() -> dict[str, Any]:
        with urllib.request.urlopen(operator.health_url, timeout=5) as response:
            assert response.status == 200
            return dict(json.load(response))

    report = wait_for(healthy, 60, "the liveness endpoint to answer")
    assert 0 <= report["refreshAgeSeconds"] < 300


def test_liveness_tracks_the_heartbeat_coming_back_through_the_watch(
    operator: Any, core: client.CoreV1Api
) -> None:
    """The operator rewrites its heartbeat ConfigMap every refresh (15 s); /healthz reports how long
    ago the watch last delivered it. A watch that delivered nothing would report the operator's
    whole uptime, which is over 30 s once two beats were written."""
    import urllib.request

    def beat() -> str | None:
        try:
            return str(core.read_namespaced_config_map("finetune-operator-heartbeat", "default").data["time"])
        except client.ApiException:
            return None

    first = wait_for(beat, 60, "the first heartbeat")
    wait_for(lambda: (beat() or first) != first, 60, "a second heartbeat")
    with urllib.request.urlopen(operator.health_url, timeout=5) as response:
        report = json.load(response)
    assert 0 <= report["watchSilenceSeconds"] < 20, report
