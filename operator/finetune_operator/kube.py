"""The few API calls the handlers make, over the official client. Nothing here decides anything."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config, dynamic
from kubernetes.client.rest import ApiException

from finetune_operator import api

FIELD_MANAGER = "finetune-operator"
REQUEST_TIMEOUT_S = 30.0


class TimeoutApiClient(client.ApiClient):  # type: ignore[misc]
    """Every call gets a deadline: without one, a request to an API server that stopped answering
    waits forever, and the handler (or the refresh loop) with it."""

    def call_api(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = REQUEST_TIMEOUT_S
        return super().call_api(*args, **kwargs)


def connect() -> Any:
    """An API client: in-cluster when running in a pod, else the current kubeconfig."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return TimeoutApiClient()


@dataclass
class Kube:
    """Thin, typed-at-the-edges access to the objects a FineTuneJob involves."""

    api_client: Any
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def core(self) -> Any:
        return client.CoreV1Api(self.api_client)

    def _resource(self, manifest: Mapping[str, Any]) -> Any:
        if "dynamic" not in self._cache:
            self._cache["dynamic"] = dynamic.DynamicClient(self.api_client)
        return self._cache["dynamic"].resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])

    def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply: idempotent create-or-update owned by the operator."""
        result = self._resource(manifest).server_side_apply(
            body=dict(manifest),
            namespace=manifest["metadata"]["namespace"],
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )
        return dict(result.to_dict())

    def read(self, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
        """The object a manifest names, as the API server has it; None when there is none."""
        meta = manifest["metadata"]
        try:
            found = self._resource(manifest).get(name=meta["name"], namespace=meta["namespace"])
        except dynamic.exceptions.NotFoundError:
            return None
        return dict(found.to_dict())

    def create_if_absent(self, manifest: Mapping[str, Any]) -> bool:
        """Creates the object unless one of its name exists; True when it was created. For objects
        another party writes after creation (the trainer's progress ConfigMap), and for children
        of a launched job, which are restored when missing but never rewritten."""
        try:
            self._resource(manifest).create(body=dict(manifest), namespace=manifest["metadata"]["namespace"])
        except dynamic.exceptions.ConflictError:
            return False
        return True

    def patch_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        client.BatchV1Api(self.api_client).patch_namespaced_job(
            name, namespace, {"spec": {"suspend": suspend}}
        )

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            job = client.BatchV1Api(self.api_client).read_namespaced_job(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(self.api_client.sanitize_for_serialization(job))

    def pods_of(self, namespace: str, job_uid: str, label: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{label}={job_uid}")
        return [self.api_client.sanitize_for_serialization(p) for p in pods.items]

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(self.api_client.sanitize_for_serialization(found))

    def secret_keys(self, namespace: str, names: set[str]) -> tuple[dict[str, set[str]], dict[str, str]]:
        """Which keys each named Secret has, and its resourceVersion. Values are never kept."""
        keys: dict[str, set[str]] = {}
        versions: dict[str, str] = {}
        for name in sorted(names):
            try:
                secret = self.core.read_namespaced_secret(name, namespace)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                raise
            keys[name] = set((secret.data or {}).keys()) | set((secret.string_data or {}).keys())
            versions[name] = str(secret.metadata.resource_version)
        return keys, versions

    def node_labels(self) -> tuple[list[dict[str, str]], list[str]]:
        """Labels and provider ids of the nodes, for environment detection. Empty when not allowed."""
        try:
            nodes = self.core.list_node().items
        except ApiException as exc:
            if exc.status == 403:
                return [], []
            raise
        return [dict(n.metadata.labels or {}) for n in nodes], [n.spec.provider_id or "" for n in nodes]

    def read_job_resource(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = client.CustomObjectsApi(self.api_client).get_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(obj)

    def list_job_resources(self, namespaces: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Every FineTuneJob the operator watches (per namespace in namespaced mode)."""
        custom = client.CustomObjectsApi(self.api_client)
        if not namespaces:
            return list(
                custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL).get("items", [])
            )
        items: list[dict[str, Any]] = []
        for namespace in namespaces:
            found = custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL)
            items += found.get("items", [])
        return items

    def job_refusals(self, namespace: str, job_uid: str) -> list[str]:
        """The Job controller's FailedCreate messages about a Job, oldest first."""
        events = self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.uid={job_uid},reason=FailedCreate"
        ).items
        events.sort(key=lambda e: str(e.last_timestamp or e.event_time or e.metadata.creation_timestamp))
        return [str(e.message or "") for e in events]

    def event(self, body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        """A core/v1 Event about the FineTuneJob, as `kubectl describe ftj` shows them."""
        meta = body["metadata"]
        now = datetime.now(UTC)
        self.core.create_namespaced_event(
            meta["namespace"],
            {
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {
                    "apiVersion": api.API_VERSION,
                    "kind": api.KIND,
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta["uid"],
                },
                "type": kind,
                "reason": reason,
                "message": message[:1024],
                "source": {"component": FIELD_MANAGER},
                "reportingComponent": FIELD_MANAGER,
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            },
        )

    def patch_status(
        self, namespace: str, name: str, patch: Mapping[str, Any], resource_version: str | None = None
    ) -> bool:
        """Merge-patches the status. With `resource_version`, only if nobody wrote in between:
        returns False on such a conflict (the caller re-reads and retries)."""
        body: dict[str, Any] = {"status": dict(patch)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            client.CustomObjectsApi(self.api_client).patch_namespaced_custom_object_status(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, body
            )
        except ApiException as exc:
            if exc.status == 409:
                return False
            if exc.status == 404:  # deleted meanwhile: nothing left to report on
                return True
            raise
        return True
