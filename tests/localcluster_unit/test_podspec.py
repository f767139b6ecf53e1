"""How the node agent resolves a pod's env and volumes: the kubelet's rules, table-driven."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from localcluster.nodeagent.podspec import (
    MountError,
    PodContext,
    container_env,
    expand,
    materialize_volume,
    parse_quantity,
)

POD: dict[str, Any] = {
    "metadata": {
        "name": "trainer-0",
        "namespace": "team-a",
        "uid": "u-123",
        "labels": {"app": "ft"},
        "annotations": {"batch.kubernetes.io/job-completion-index": "1"},
    },
    "spec": {"serviceAccountName": "trainer"},
}
CTX = PodContext(pod=POD, pod_ip="127.0.1.7", node_name="node-a")


class FakeObjects:
    """In-memory secrets and config maps (the agent reads these from the API server)."""

    secrets = {("team-a", "s3"): {"accessKeyId": "AKIA", "secretAccessKey": "shh"}}
    config_maps = {("team-a", "cfg"): {"config.json": '{"a": 1}', "mode": "fast"}}

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get((namespace, name))

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.config_maps.get((namespace, name))

    def token(
        self, namespace: str, service_account: str, pod: Any, audience: str | None, seconds: int
    ) -> str:
        return f"token-for-{namespace}-{service_account}"

    def root_ca(self) -> str:
        return "CA"


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("$(A)-$(B)", {"A": "1", "B": "2"}, "1-2"),
        ("$(MISSING)", {}, "$(MISSING)"),
        ("$$(A)", {"A": "1"}, "$(A)"),
        ("plain", {}, "plain"),
    ],
)
def test_expand_follows_kubernetes_rules(text: str, env: dict[str, str], expected: str) -> None:
    assert expand(text, env) == expected


@pytest.mark.parametrize(("quantity", "value"), [("500m", 0.5), ("2Gi", 2 * 2**30), ("1", 1), ("3k", 3000)])
def test_parse_quantity(quantity: str, value: float) -> None:
    assert parse_quantity(quantity) == pytest.approx(value)


@pytest.mark.parametrize(
    ("var", "expected"),
    [
        ({"name": "X", "value": "v"}, "v"),
        ({"name": "X", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "accessKeyId"}}}, "AKIA"),
        ({"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}}, "fast"),
        ({"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}, "127.0.1.7"),
        ({"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}, "u-123"),
        (
            {
                "name": "X",
                "valueFrom": {
                    "fieldRef": {
                        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                    }
                },
            },
            "1",
        ),
        ({"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}, "2"),
    ],
)
def test_env_sources_resolve(var: dict[str, Any], expected: str) -> None:
    container = {"name": "c", "env": [var], "resources": {"limits": {"cpu": "1500m"}}}
    assert container_env(CTX, container, FakeObjects())["X"] == expected


def test_env_from_and_prefix() -> None:
    container = {"name": "c", "envFrom": [{"secretRef": {"name": "s3"}, "prefix": "AWS_"}]}
    env = container_env(CTX, container, FakeObjects())
    assert env == {"AWS_accessKeyId": "AKIA", "AWS_secretAccessKey": "shh"}


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ({"name": "nope", "key": "k"}, 'secret "nope" not found'),
        ({"name": "s3", "key": "nope"}, 'key "nope" not found in secret "s3"'),
    ],
)
def test_missing_secret_is_a_retryable_mount_error(ref: dict[str, str], message: str) -> None:
    container = {"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": ref}}]}
    with pytest.raises(MountError, match=message):
        container_env(CTX, container, FakeObjects())


def test_optional_missing_secret_is_skipped() -> None:
    ref = {"name": "nope", "key": "k", "optional": True}
    container = {"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": ref}}]}
    assert "X" not in container_env(CTX, container, FakeObjects())


def test_projected_service_account_volume(tmp_path: Path) -> None:
    volume = {
        "name": "kube-api-access",
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                    }
                },
            ]
        },
    }
    materialize_volume(CTX, volume, tmp_path / "sa", FakeObjects())
    assert (tmp_path / "sa" / "token").read_text() == "token-for-team-a-trainer"
    assert (tmp_path / "sa" / "ca.crt").read_text() == "CA"
    assert (tmp_path / "sa" / "namespace").read_text() == "team-a"


def test_config_map_volume_items_and_mode(tmp_path: Path) -> None:
    volume = {
        "name": "config",
        "configMap": {
            "name": "cfg",
            "items": [{"key": "config.json", "path": "c.json"}],
            "defaultMode": 0o440,
        },
    }
    materialize_volume(CTX, volume, tmp_path / "v", FakeObjects())
    assert [p.name for p in (tmp_path / "v").iterdir()] == ["c.json"]
    assert (tmp_path / "v" / "c.json").stat().st_mode & 0o777 == 0o440


def test_a_container_without_command_runs_its_images_entrypoint_under_tini() -> None:
    from localcluster.nodeagent.podspec import container_argv
    from localcluster.tools import REPO_ROOT

    container = {"name": "trainer", "image": "ghcr.io/finetune-dev/finetune-trainer:0.1.0", "args": ["--x"]}
    argv = container_argv(container, REPO_ROOT, {"/usr/bin/tini": "/cache/bin/tini"})
    assert argv == ["/cache/bin/tini", "--", "python", "-m", "finetune_trainer", "--x"]
    # A command replaces the ENTRYPOINT, as on a real node.
    assert container_argv({**container, "command": ["sh"]}, REPO_ROOT, {}) == ["sh", "--x"]


def test_an_unknown_image_without_command_is_refused_by_name() -> None:
    from localcluster.nodeagent.podspec import MountError, container_argv
    from localcluster.tools import REPO_ROOT

    with pytest.raises(MountError, match=r"image 'busybox:1' is not one of this project's"):
        container_argv({"name": "c", "image": "busybox:1"}, REPO_ROOT, {})
