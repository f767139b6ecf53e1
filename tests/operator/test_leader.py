"""Leader election: the rule as a table, and two electors racing for one Lease on the real API server."""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client

from finetune_operator import leader
from finetune_operator.leader import Seen, Step
from finetune_operator.settings import OperatorSettings
from localcluster.testing import unique_name

ME, OTHER = "operator-a_1", "operator-b_1"


def seen(holder: str, since: float, duration: float = 15.0, version: str = "7") -> Seen:
    return Seen(holder=holder, duration_s=duration, version=version, since=since)


@pytest.mark.parametrize(
    ("record", "now", "step"),
    [
        (None, 0.0, Step.CREATE),
        (seen(ME, since=0.0), 100.0, Step.RENEW),  # ours, even if we saw it long ago
        (seen(OTHER, since=0.0), 14.9, Step.WAIT),  # alive: its record changed 14.9 s ago
        (seen(OTHER, since=0.0), 15.0, Step.TAKE),  # unchanged for a whole lease duration
        (seen(OTHER, since=10.0, duration=1.0), 10.5, Step.WAIT),
        (seen("", since=0.0), 0.0, Step.TAKE),  # released by a leader that stopped cleanly
    ],
)
def test_next_step(record: Seen | None, now: float, step: Step) -> None:
    assert leader.next_step(record, ME, now) is step


def test_expiry_counts_from_when_the_record_last_changed_here() -> None:
    first = leader.observe(None, OTHER, 15.0, "7", now=100.0)
    again = leader.observe(first, OTHER, 15.0, "7", now=110.0)
    assert again.since == 100.0, "an unchanged record keeps its first sighting"
    renewed = leader.observe(again, OTHER, 15.0, "8", now=112.0)
    assert renewed.since == 112.0, "a renewal restarts the clock (no clocks compared across machines)"
    assert leader.next_step(renewed, ME, now=120.0) is Step.WAIT


@pytest.mark.parametrize(
    ("namespaces", "skip", "watched", "skipped", "kept"),
    [
        ((), (), [], [], ["a"]),
        (("a", "b"), (), ["a", "b"], [], ["a"]),
        ((), ("solo-*", "trial"), ["!solo-*, !trial"], ["solo-x", "trial"], ["solo", "trial-2"]),
    ],
)
def test_watched_namespaces(
    namespaces: tuple[str, ...],
    skip: tuple[str, ...],
    watched: list[str],
    skipped: list[str],
    kept: list[str],
) -> None:
    settings = OperatorSettings(namespaces=namespaces, skip_namespaces=skip)
    assert settings.watched_namespaces() == watched
    assert [n for n in skipped + kept if settings.skips(n)] == skipped


def test_skipping_namespaces_needs_all_namespaces_watched() -> None:
    with pytest.raises(ValueError, match="FINETUNE_OPERATOR_SKIP_NAMESPACES applies only when"):
        OperatorSettings(namespaces=("a",), skip_namespaces=("b",))


def elector(kube: client.ApiClient, name: str, me: str, duration: float = 3.0) -> leader.Elector:
    return leader.Elector(
        coordination=client.CoordinationV1Api(kube),
        namespace="default",
        name=name,
        me=me,
        duration_s=duration,
        renew_s=0.3,
        deadline_s=duration * 2 / 3,
    )


@pytest.mark.cluster
def test_of_two_electors_one_leads_and_the_other_takes_over(kube: client.ApiClient) -> None:
    name = unique_name("lease")
    a, b = elector(kube, name, ME), elector(kube, name, OTHER)
    stop = threading.Event()
    assert a.try_once() and not b.try_once()
    holding = threading.Thread(target=a.hold, args=(stop, lambda: None), daemon=True)
    holding.start()
    # While a renews, b waits well past a lease duration without taking over.
    started = time.monotonic()
    while time.monotonic() - started < 2 * a.duration_s:
        assert not b.try_once()
        time.sleep(0.2)
    stop.set()
    holding.join()
    # a stops renewing (as if killed): b takes over once the record went unchanged for a lease duration.
    waited = time.monotonic()
    while not b.try_once():
        assert time.monotonic() - waited < a.duration_s + 2, "no take-over"
        time.sleep(0.2)
    assert time.monotonic() - waited >= a.duration_s - 0.5, "taken over before the lease expired"
    lease = client.CoordinationV1Api(kube).read_namespaced_lease(name, "default")
    assert (lease.spec.holder_identity, lease.spec.lease_transitions) == (OTHER, 1)
    # A clean stop hands over at once.
    b.release()
    assert a.try_once(), "a released lease is free"


@pytest.mark.cluster
def test_a_leader_that_cannot_renew_stops_before_its_lease_expires(kube: client.ApiClient) -> None:
    name = unique_name("lease")
    a = elector(kube, name, ME)
    assert a.try_once()
    lost: list[float] = []
    stop = threading.Event()
    a.coordination = client.CoordinationV1Api(
        client.ApiClient(client.Configuration(host="http://127.0.0.1:9"))
    )
    renewed = time.monotonic()
    holding = threading.Thread(target=a.hold, args=(stop, lambda: lost.append(time.monotonic())), daemon=True)
    holding.start()
    holding.join(timeout=10)
    assert lost, "a leader that cannot reach the API server must give up"
    assert lost[0] - renewed < a.duration_s, "gave up only after another replica could take over"
    assert not a.leading
