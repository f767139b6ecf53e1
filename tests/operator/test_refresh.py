"""The periodic refresh over every job: finished jobs cost no request, and one job's failure
never stops the pass for the others."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from finetune_operator import handlers, metrics
from finetune_operator.settings import OperatorSettings


def item(name: str, phase: str | None, completed: bool = False, namespace: str = "ns") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase} if phase else {}
    if completed:
        status["completionTime"] = "2026-12-01T10:00:00Z"
    return {"metadata": {"namespace": namespace, "name": name}, "status": status}


@pytest.mark.parametrize(
    ("job", "refresh"),
    [
        (item("new", None), True),
        (item("training", "Training"), True),
        (item("suspended", "Suspended"), True),
        (item("failed-before-launch", "Failed"), True),  # refused specs get no completionTime
        (item("done", "Succeeded", completed=True), False),
        (item("failed", "Failed", completed=True), False),
    ],
)
def test_needs_refresh(job: dict[str, Any], refresh: bool) -> None:
    assert handlers.needs_refresh(job) is refresh


class ListingKube:
    def __init__(self, items: list[dict[str, Any]], stop: threading.Event) -> None:
        self.items, self.stop, self.lists = items, stop, 0

    def list_job_resources(self, namespaces: tuple[str, ...]) -> list[dict[str, Any]]:
        self.lists += 1
        self.stop.set()  # one pass
        return self.items


def test_one_failing_job_does_not_stop_the_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()
    items = [
        item("a", "Training"),
        item("broken", "Training"),
        item("c", "Preparing"),
        item("d", "Succeeded", True),
        item("trial", "Training", namespace="team-x-trial"),  # another operator's namespace
    ]
    kube = ListingKube(items, stop)
    monkeypatch.setitem(handlers._state, "kube", kube)
    settings = OperatorSettings(skip_namespaces=("team-x-*",), heartbeat_namespace="")
    monkeypatch.setitem(handlers._state, "settings", settings)
    synced: list[str] = []

    def sync(namespace: str, name: str) -> None:
        synced.append(name)
        if name == "broken":
            raise RuntimeError("the API server refused this one")

    monkeypatch.setattr(handlers, "sync_status", sync)
    before = metrics.SYNC_ERRORS.labels("ns", "broken")._value.get()
    handlers.refresh_forever(stop, interval=0.01)
    assert synced == ["a", "broken", "c"], "every unfinished job, none finished or skipped"
    assert metrics.SYNC_ERRORS.labels("ns", "broken")._value.get() == before + 1
    assert kube.lists == 1, "one listing per pass, shared with the fleet gauge"
    assert metrics.JOB_PHASE.labels("ns", "d", "Succeeded")._value.get() == 1


def test_a_burst_of_new_jobs_reads_the_nodes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    class NodesKube:
        lists = 0

        def node_labels(self) -> tuple[list[dict[str, str]], list[str]]:
            self.lists += 1
            return [{"nvidia.com/gpu.memory": "81920"}], ["aws:///us-east-1a/i-1"]

    kube = NodesKube()
    monkeypatch.setitem(handlers._state, "kube", kube)
    monkeypatch.delitem(handlers._state, "node_labels", raising=False)
    for _ in range(50):
        assert handlers._node_labels()[1] == ["aws:///us-east-1a/i-1"]
    assert kube.lists == 1
    monkeypatch.setattr(handlers, "NODE_LABELS_TTL_S", 0.0)
    handlers._node_labels()
    assert kube.lists == 2, "read again once the labels may have changed"
