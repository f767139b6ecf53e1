"""The Helm chart: lint, what it renders for each profile, RBAC, the schema, monitoring objects."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
PROFILES = ["default", "onprem", "cloud"]
Manifest = dict[str, Any]
Render = Callable[..., list[Manifest]]

# The contract between the chart and `python -m finetune_operator`.
OPERATOR_ENV = {
    "FINETUNE_OPERATOR_NAMESPACES",
    "FINETUNE_OPERATOR_ENVIRONMENT",
    "FINETUNE_OPERATOR_TRAINER_IMAGE",
    "FINETUNE_OPERATOR_GPU_MEMORY_GIB",
    "FINETUNE_OPERATOR_METRICS_PORT",
    "FINETUNE_OPERATOR_HEALTH_PORT",
    "FINETUNE_OPERATOR_LOG_LEVEL",
}


def of_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[Manifest], kind: str) -> Manifest:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def env_of(objects: list[Manifest]) -> dict[str, str]:
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", "") for item in container["env"]}


def roles(objects: list[Manifest]) -> list[Manifest]:
    return of_kind(objects, "Role") + of_kind(objects, "ClusterRole")


def aggregated(role: Manifest) -> bool:
    """The chart's ClusterRoles for people (folded into edit/view), not the operator's."""
    labels = role["metadata"].get("labels", {})
    return any(key.startswith("rbac.authorization.k8s.io/aggregate-to-") for key in labels)


def operator_objects(objects: list[Manifest]) -> list[Manifest]:
    """Everything but the aggregated user roles and the webhook's Service."""
    return [
        obj
        for obj in objects
        if not (obj["kind"] == "ClusterRole" and aggregated(obj))
        and obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "webhook"
    ]


def verbs_on(role: Manifest, resource: str, group: str = "") -> set[str]:
    return {
        verb
        for rule in role["rules"]
        if resource in rule["resources"] and group in rule["apiGroups"]
        for verb in rule["verbs"]
    }


@pytest.mark.parametrize("profile", PROFILES)
def test_lint(helm: Callable[..., Any], template_args: Callable[..., list[str]], profile: str) -> None:
    args = template_args(profile, command="lint")
    result = helm("lint", "--strict", *args[2:])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_operator_runs_restricted(render: Render, profile: str) -> None:
    objects = render(profile)
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = spec["template"]["spec"]
    container = pod["containers"][0]

    pod_sc, sc = pod["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = env_of(objects)
    assert str(ports["health"]) == env["FINETUNE_OPERATOR_HEALTH_PORT"]
    assert str(ports["metrics"]) == env["FINETUNE_OPERATOR_METRICS_PORT"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["tcpSocket"]["port"] in ports, "ready once it serves"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize("profile", PROFILES)
def test_operator_env_follows_the_contract(render: Render, profile: str) -> None:
    env = env_of(render(profile))
    assert env.keys() >= OPERATOR_ENV
    assert env["FINETUNE_OPERATOR_ENVIRONMENT"] in {"auto", "cloud", "onprem"}
    assert env["FINETUNE_OPERATOR_TRAINER_IMAGE"].startswith("ghcr.io/") or profile == "onprem"
    assert re.fullmatch(r"\S+:\S+", env["FINETUNE_OPERATOR_TRAINER_IMAGE"])


def test_profiles_set_method_defaults_and_storage(render: Render) -> None:
    onprem, cloud = env_of(render("onprem")), env_of(render("cloud"))
    assert onprem["FINETUNE_OPERATOR_ENVIRONMENT"] == "onprem"  # method auto -> QLoRA
    assert onprem["FINETUNE_OPERATOR_CHECKPOINT_ENDPOINT"].startswith("http://")
    assert onprem["FINETUNE_OPERATOR_CHECKPOINT_PATH_STYLE"] == "true"
    assert cloud["FINETUNE_OPERATOR_ENVIRONMENT"] == "cloud"  # method auto -> full + DeepSpeed
    assert cloud["FINETUNE_OPERATOR_CHECKPOINT_ENDPOINT"] == ""  # AWS S3
    annotations = json.loads(cloud["FINETUNE_OPERATOR_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS"])
    assert annotations["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


@pytest.mark.parametrize("profile", PROFILES)
def test_no_secret_material_is_rendered(render: Render, profile: str) -> None:
    objects = render(profile)
    # The one Secret is the webhook's serving certificate, generated at install; no credentials.
    secrets = of_kind(objects, "Secret")
    assert [(s["type"], sorted(s["data"])) for s in secrets] == [
        ("kubernetes.io/tls", ["ca.crt", "tls.crt", "tls.key"])
    ]
    text = yaml.safe_dump_all([o for o in objects if o["kind"] != "Secret"])
    for marker in ("AWS_SECRET_ACCESS_KEY", "secretAccessKey:", "password:", "token:"):
        assert marker not in text


@pytest.mark.parametrize("profile", PROFILES)
def test_rbac_is_least_privilege(render: Render, profile: str) -> None:
    objects = render(profile)
    assert roles(objects), "no Role or ClusterRole rendered"
    for role in roles(objects):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {role['metadata']['name']}: {rule}"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
            assert "pods/exec" not in rule["resources"]
        assert verbs_on(role, "secrets") <= {"get"}, "Secrets: get by name only, never list or watch"


def test_every_rbac_rule_says_why(helm: Callable[..., Any], template_args: Callable[..., list[str]]) -> None:
    """Reviewers read the reason for each permission next to it in the rendered output."""
    for sets in ([], ["operator.namespaces={a,b}"]):
        out = helm(*template_args(sets=sets, monitoring=False)).stdout
        for document in out.split("\n---\n"):
            if not re.search(r"^kind: (Cluster)?Role$", document, re.MULTILINE):
                continue
            lines = document.splitlines()
            for i, line in enumerate(lines):
                if line.lstrip().startswith("- apiGroups:"):
                    assert lines[i - 1].lstrip().startswith("#"), f"rule without a reason: {lines[i : i + 3]}"


def job_roles(objects: list[Manifest], kind: str) -> list[Manifest]:
    """Roles (or bindings) for acting on jobs: all but the leader-election Lease's."""
    return [o for o in of_kind(objects, kind) if not o["metadata"]["name"].endswith("-leader")]


def test_cluster_wide_mode(render: Render) -> None:
    objects = operator_objects(render())
    assert not job_roles(objects, "Role") and not job_roles(objects, "RoleBinding")
    role, binding = one(objects, "ClusterRole"), one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": one(objects, "ServiceAccount")["metadata"]["name"],
            "namespace": "finetune-system",
        }
    ]
    assert verbs_on(role, "nodes") == {"get", "list"}
    assert env_of(objects)["FINETUNE_OPERATOR_NAMESPACES"] == ""
    assert one(objects, "PodMonitor")["spec"]["namespaceSelector"] == {"any": True}


def test_namespaced_mode(render: Render) -> None:
    objects = operator_objects(render(sets=["operator.namespaces={team-a,team-b}"]))
    role_namespaces = sorted(r["metadata"]["namespace"] for r in job_roles(objects, "Role"))
    binding_namespaces = sorted(b["metadata"]["namespace"] for b in job_roles(objects, "RoleBinding"))
    assert role_namespaces == binding_namespaces == ["team-a", "team-b"]
    # Only nodes (cluster-scoped) remain in a ClusterRole.
    cluster_role = one(objects, "ClusterRole")
    assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == {"nodes"}
    assert env_of(objects)["FINETUNE_OPERATOR_NAMESPACES"] == "team-a,team-b"
    selector = one(objects, "PodMonitor")["spec"]["namespaceSelector"]
    assert selector == {"matchNames": ["team-a", "team-b"]}

    no_nodes = operator_objects(render(sets=["operator.namespaces={team-a}", "rbac.readNodes=false"]))
    assert not of_kind(no_nodes, "ClusterRole") and not of_kind(no_nodes, "ClusterRoleBinding")
    assert env_of(no_nodes)["FINETUNE_OPERATOR_READ_NODES"] == "false"


def test_replicas_share_one_lease_and_spread_over_nodes(render: Render) -> None:
    objects = operator_objects(render())
    deployment = one(objects, "Deployment")
    name = deployment["metadata"]["name"]
    env = env_of(objects)
    assert env["FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE"] == "finetune-system"
    assert env["FINETUNE_OPERATOR_LEADER_ELECTION_LEASE"] == name
    assert env["FINETUNE_OPERATOR_LEADER_ELECTION_SECONDS"] == "15"
    (leader,) = [r for r in of_kind(objects, "Role") if r["metadata"]["name"] == f"{name}-leader"]
    assert leader["metadata"]["namespace"] == "finetune-system"
    by_verbs = {tuple(r["verbs"]): r.get("resourceNames") for r in leader["rules"]}
    assert by_verbs == {("create",): None, ("get", "update"): [name]}
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["labelSelector"] == deployment["spec"]["selector"]

    single = operator_objects(render(sets=["replicas=1"]))
    assert not of_kind(single, "PodDisruptionBudget"), "a PDB on one replica would block every drain"
    assert "affinity" not in one(single, "Deployment")["spec"]["template"]["spec"]


@pytest.mark.parametrize("sets", [[], ["operator.namespaces={team-a}"]])
def test_operator_holds_what_it_grants_the_trainer(render: Render, sets: list[str]) -> None:
    """Without `escalate`, the operator may only create the trainer's Role (get/patch on its progress
    ConfigMap) because it holds those verbs itself, and the binding because it may create one."""
    namespaced = [r for r in roles(render(sets=sets)) if verbs_on(r, "configmaps")]
    assert namespaced
    for role in namespaced:
        assert verbs_on(role, "configmaps") >= {"get", "patch", "create"}
        assert verbs_on(role, "roles", "rbac.authorization.k8s.io") >= {"create"}
        assert verbs_on(role, "rolebindings", "rbac.authorization.k8s.io") >= {"create"}
        assert verbs_on(role, "serviceaccounts") >= {"create"}
        assert verbs_on(role, "jobs", "batch") >= {"create", "watch"}
        assert verbs_on(role, "finetunejobs/status", "finetune.dev") >= {"patch"}
        assert verbs_on(role, "pods") == {"get", "list", "watch"}


def test_secrets_access_can_be_turned_off(render: Render) -> None:
    objects = render(sets=["rbac.readSecrets=false"])
    assert all(not verbs_on(role, "secrets") for role in roles(objects))
    assert env_of(objects)["FINETUNE_OPERATOR_CHECK_SECRETS"] == "false"
    assert env_of(render())["FINETUNE_OPERATOR_CHECK_SECRETS"] == "true"


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"operator": {"gpuMemoryGiB": "lots"}}, "/operator/gpuMemoryGiB"),
        ({"operator": {"namespaces": "team-a,team-b"}}, "/operator/namespaces"),
        ({"operator": {"environment": "gcp"}}, "/operator/environment"),
        ({"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
        ({"rbac": {"readSecrets": "no"}}, "/rbac/readSecrets"),
        ({"trainer": {"checkpointStore": {"endpoint": "minio:9000"}}}, "/trainer/checkpointStore/endpoint"),
        ({"operatr": {"namespaces": ["a"]}}, "operatr"),
        ({"rbac": {"create": True, "wildcard": True}}, "wildcard"),
    ],
)
def test_schema_rejects_bad_values_naming_the_key(
    helm: Callable[..., Any],
    template_args: Callable[..., list[str]],
    tmp_path: Path,
    values: dict[str, Any],
    key: str,
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm(*template_args(values=[path]))
    assert result.returncode != 0
    assert "schema" in result.stderr and key in result.stderr, result.stderr


def test_monitoring_objects_follow_the_cluster(render: Render) -> None:
    monitoring = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    kinds = lambda objects: {o["kind"] for o in objects}  # noqa: E731
    assert kinds(render(monitoring=True)) >= monitoring
    assert not kinds(render(monitoring=False)) & monitoring
    forced = ["serviceMonitor.enabled=true", "podMonitor.enabled=true", "prometheusRule.enabled=true"]
    assert kinds(render(sets=forced, monitoring=False)) >= monitoring
    off = ["serviceMonitor.enabled=false", "podMonitor.enabled=false", "prometheusRule.enabled=false"]
    assert not kinds(render(sets=off, monitoring=True)) & monitoring


def test_scrape_targets(render: Render) -> None:
    objects = operator_objects(render())
    service = one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    pods = one(objects, "PodMonitor")["spec"]
    assert pods["selector"]["matchLabels"] == {"app.kubernetes.io/name": "finetune-trainer"}
    endpoint = pods["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics"
    # The series' own namespace/job labels are the FineTuneJob's; they must not become exported_*.
    assert endpoint["honorLabels"] is True and monitor["spec"]["endpoints"][0]["honorLabels"] is True


def test_trainers_linger_for_the_pod_monitor_s_interval(render: Render) -> None:
    """The operator renders how long a finished trainer keeps /metrics up from this interval."""
    objects = render(sets=["podMonitor.interval=1m30s"])
    assert one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["interval"] == "1m30s"
    assert env_of(objects)["FINETUNE_OPERATOR_TRAINER_SCRAPE_INTERVAL"] == "1m30s"


def test_prometheus_rule_is_the_alerts_file(render: Render) -> None:
    rule = one(render(), "PrometheusRule")
    expected = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == expected["groups"]


def test_prometheus_rule_overrides(render: Render) -> None:
    sets = [
        "prometheusRule.disabledAlerts={FineTuneLossDiverging}",
        "prometheusRule.alertOverrides.FineTuneJobNoProgress.for=1h",
        "prometheusRule.alertOverrides.FineTuneJobNoProgress.severity=critical",
        "prometheusRule.additionalAlertLabels.team=ml-platform",
        "prometheusRule.runbookBaseUrl=https://wiki.example/finetune",
    ]
    rules = {
        r["alert"]: r for g in one(render(sets=sets), "PrometheusRule")["spec"]["groups"] for r in g["rules"]
    }
    assert "FineTuneLossDiverging" not in rules
    assert rules["FineTuneJobNoProgress"]["for"] == "1h"
    assert rules["FineTuneJobNoProgress"]["labels"] == {"severity": "critical", "team": "ml-platform"}
    assert rules["FineTuneJobFailed"]["labels"] == {"severity": "warning", "team": "ml-platform"}
    assert rules["FineTuneJobFailed"]["annotations"]["runbook_url"] == (
        "https://wiki.example/finetune#finetunejobfailed"
    )


def test_dashboard_configmap(render: Render) -> None:
    config_map = one(render(), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "finetune.json").read_text())
    assert json.loads(config_map["data"]["finetune.json"]) == shipped
    other = one(render(sets=["dashboards.namespace=monitoring"]), "ConfigMap")
    assert other["metadata"]["namespace"] == "monitoring"
    assert not of_kind(render(sets=["dashboards.enabled=false"]), "ConfigMap")


def test_chart_crd_matches_the_generated_crd() -> None:
    generated = REPO / "crds" / "finetune.dev_finetunejobs.yaml"
    shipped = CHART / "crds" / "finetune.dev_finetunejobs.yaml"
    if not generated.exists():
        pytest.skip(f"{generated.relative_to(REPO)} not generated yet (`make crds`)")
    assert shipped.read_text() == generated.read_text(), (
        f"{shipped.relative_to(REPO)} differs from {generated.relative_to(REPO)}: run `make crds`, "
        "which writes both"
    )


def test_notes_tell_the_user_what_to_do(helm: Callable[..., Any], tmp_path: Path) -> None:
    # NOTES.txt renders only on install; a template in a copy of the chart shows it offline.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "notes-preview.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ include "finetune-operator/templates/NOTES.txt" . | quote }}\n'
    )
    result = helm(
        "template",
        "ft",
        str(chart),
        "--namespace",
        "finetune-system",
        "--show-only",
        "templates/notes-preview.yaml",
        "--set",
        "operator.namespaces={team-a}",
    )
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["data"]["notes"]
    assert "kubectl -n finetune-system rollout status deployment/ft-finetune-operator" in notes
    assert "team-a (namespaced mode)" in notes
    assert "kubectl -n <namespace> get ftj" in notes
    assert "No prometheus-operator API was found" in notes
    assert "keeps the FineTuneJob CRD" in notes


def _schema_leaves(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    properties = schema.get("properties")
    if not properties:
        return [path]
    return [leaf for key, sub in properties.items() for leaf in _schema_leaves(sub, (*path, key))]


def _documented_keys(text: str) -> set[tuple[str, ...]]:
    """Key paths in values.yaml whose line is preceded by a `# --` comment block."""
    documented: set[tuple[str, ...]] = set()
    stack: list[tuple[int, str]] = []
    previous_is_doc = False
    in_doc = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            in_doc = True
            continue
        if stripped.startswith("#"):
            continue
        match = re.match(r"^( *)([A-Za-z][\w.]*):", line)
        if not match:
            in_doc = previous_is_doc = False
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        previous_is_doc, in_doc = in_doc, False
        if previous_is_doc:
            documented.add(tuple(k for _, k in stack))
    return documented


def test_values_are_documented_field_by_field() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    documented = _documented_keys((CHART / "values.yaml").read_text())
    leaves = [leaf for leaf in _schema_leaves(schema) if leaf != ("global",)]
    missing = [".".join(leaf) for leaf in leaves if leaf not in documented]
    assert not missing, f"values without a `# --` comment: {missing}"


@pytest.mark.parametrize("profile", PROFILES)
def test_operator_reads_every_variable_the_chart_sets(render: Render, profile: str) -> None:
    from finetune_operator.settings import OperatorSettings

    prefix = str(OperatorSettings.model_config.get("env_prefix", "")).upper()
    understood = {prefix + name.upper() for name in OperatorSettings.model_fields}
    ignored = sorted(set(env_of(render(profile))) - understood)
    assert not ignored, f"the operator ignores these variables the chart sets: {ignored}"


def test_users_with_edit_or_view_get_finetunejobs(render: Render) -> None:
    user_roles = {r["metadata"]["name"]: r for r in of_kind(render(), "ClusterRole") if aggregated(r)}
    edit, view = user_roles["ft-finetune-operator-edit"], user_roles["ft-finetune-operator-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert {"create", "patch", "delete"} <= verbs_on(edit, "finetunejobs", "finetune.dev")
    assert verbs_on(edit, "finetunejobs/status", "finetune.dev") == {"get"}  # progress is not theirs to write
    assert verbs_on(view, "finetunejobs", "finetune.dev") == {"get", "list", "watch"}
    assert not [
        r
        for r in of_kind(render(sets=["rbac.aggregateToDefaultRoles=false"]), "ClusterRole")
        if aggregated(r)
    ]


def webhook_config(objects: list[Manifest]) -> Manifest:
    return one(objects, "MutatingWebhookConfiguration")["webhooks"][0]


def test_webhook_records_creators_of_the_release_s_namespaces(render: Render) -> None:
    objects = render(sets=["operator.namespaces={team-a,team-b}"])
    hook = webhook_config(objects)
    assert hook["rules"][0]["operations"] == ["CREATE"] and hook["rules"][0]["resources"] == ["finetunejobs"]
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a", "team-b"]
    assert hook["clientConfig"]["service"]["path"] == "/record-user"
    secret = one(objects, "Secret")
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    env = env_of(objects)
    assert env["FINETUNE_OPERATOR_WEBHOOK_PORT"] == "9443"
    assert env["FINETUNE_OPERATOR_HEARTBEAT_NAMESPACE"] == "team-a"
    assert "namespaceSelector" not in webhook_config(render())  # cluster-wide: every namespace


def test_launched_specs_are_guarded_by_a_validating_webhook(render: Render) -> None:
    objects = render(sets=["operator.namespaces={team-a}"])
    (hook,) = one(objects, "ValidatingWebhookConfiguration")["webhooks"]
    assert hook["rules"][0]["operations"] == ["UPDATE"] and hook["rules"][0]["resources"] == ["finetunejobs"]
    assert hook["clientConfig"]["service"]["path"] == "/launched-spec"
    assert hook["clientConfig"]["caBundle"] == one(objects, "Secret")["data"]["ca.crt"]
    assert hook["namespaceSelector"] == webhook_config(objects)["namespaceSelector"]
    # The operator's own writes (annotations, status) never wait for the webhook.
    conditions = {c["name"]: c["expression"] for c in hook["matchConditions"]}
    assert conditions == {
        "launched": "has(oldObject.status) && has(oldObject.status.launchTime)",
        "spec-changed": "object.spec != oldObject.spec",
    }


def test_webhook_can_be_reached_by_host_or_turned_off(render: Render) -> None:
    by_host = webhook_config(render(sets=["webhook.host=127.0.0.1", "webhook.port=9555"]))
    assert by_host["clientConfig"]["url"] == "https://127.0.0.1:9555/record-user"
    off = render(sets=["webhook.enabled=false"])
    assert not of_kind(off, "MutatingWebhookConfiguration") and not of_kind(off, "Secret")
    assert not of_kind(off, "ValidatingWebhookConfiguration")
    assert env_of(off)["FINETUNE_OPERATOR_WEBHOOK_PORT"] == "0"
