"""Helpers for tests on the local cluster: apply YAML, wait for a condition, read pod logs."""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client, dynamic

T = TypeVar("T")


class WaitTimeoutError(AssertionError):
    """A condition did not hold in time; the message shows what was last seen."""


def deep_merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `changes` into a copy of `base`; a value of None deletes the key. Tests use it
    to vary one field of a manifest."""
    out = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def wait_for(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.25,
    describe: Callable[[], Any] | None = None,
) -> T:
    """Calls `probe` until it returns something truthy; on timeout reports the last value seen
    (or what `describe` returns) so a failing test says why."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = probe()
        except Exception as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            seen = describe() if describe else last
            raise WaitTimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {seen!r}")
        time.sleep(interval)


def apply_yaml(api: client.ApiClient, text: str, namespace: str | None = None) -> list[Any]:
    """Creates (or server-side applies) every document in `text`, like `kubectl apply`."""
    dyn = dynamic.DynamicClient(api)
    created = []
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        ns = doc.get("metadata", {}).get("namespace") or (namespace if resource.namespaced else None)
        created.append(
            resource.server_side_apply(body=doc, namespace=ns, field_manager="tests", force_conflicts=True)
        )
    return created


def pod_log(run_dir: str | Path, namespace: str, pod: str, container: str | None = None) -> str:
    """A pod's container log as the node agent recorded it ('' before it starts)."""
    root = Path(run_dir) / "pods"
    pattern = f"{namespace}_{pod}_*/logs/{container or '*'}.log"
    return "".join(p.read_text(errors="replace") for p in sorted(root.glob(pattern)))


def events_for(core: client.CoreV1Api, namespace: str, name: str) -> list[str]:
    """'Reason: message' of every event about the named object."""
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return [f"{e.reason}: {e.message}" for e in events.items]
