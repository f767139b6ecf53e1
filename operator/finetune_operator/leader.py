"""One acting replica at a time: leader election over a coordination.k8s.io Lease.

Every replica serves the admission webhook; only the holder of the Lease watches FineTuneJobs and
writes children, status and events. The rules follow client-go's leader election:

- a Lease is taken over when its holder left it (empty holder) or when its record has not changed
  for a whole lease duration, measured on this replica's own clock from when it first saw that
  record (no comparison of clocks across machines);
- the holder renews every `renew_s`; one that cannot renew within `deadline_s` (shorter than the
  lease) stops acting at once, before anyone may take over;
- a holder that stops cleanly releases the Lease, so the next replica takes over within a retry.

Writes carry the resourceVersion they were decided on: of two replicas racing for a free Lease,
the API server lets exactly one win.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)


class Step(Enum):
    CREATE = "create"  # no Lease yet
    TAKE = "take"  # free or expired: write our name with the version we read
    RENEW = "renew"  # ours: write a new renewTime
    WAIT = "wait"  # someone else holds it


@dataclass(frozen=True)
class Seen:
    """A Lease record as this replica observed it."""

    holder: str
    duration_s: float
    version: str  # resourceVersion: a new one means the holder is alive (or changed)
    since: float  # monotonic time at which this version was first observed here


def next_step(seen: Seen | None, me: str, now: float) -> Step:
    """What to do with the Lease. Pure: the whole election rule, tested as a table."""
    if seen is None:
        return Step.CREATE
    if seen.holder == me:
        return Step.RENEW
    if not seen.holder or now - seen.since >= seen.duration_s:
        return Step.TAKE
    return Step.WAIT


def observe(previous: Seen | None, holder: str, duration_s: float, version: str, now: float) -> Seen:
    """The record as seen now: an unchanged version keeps the time it was first seen."""
    if previous is not None and previous.version == version:
        return previous
    return Seen(holder=holder, duration_s=duration_s, version=version, since=now)


def identity() -> str:
    """The pod name in a cluster (the hostname); the pid tells apart processes on one machine."""
    return f"{socket.gethostname()}_{os.getpid()}"


@dataclass
class Elector:
    """Takes and holds one Lease. All calls go through `coordination` (a CoordinationV1Api)."""

    coordination: Any
    namespace: str
    name: str
    me: str
    duration_s: float = 15.0
    renew_s: float = 2.0
    deadline_s: float = 10.0
    _seen: Seen | None = None
    _leading: bool = False

    @property
    def leading(self) -> bool:
        return self._leading

    def acquire(self, stop: threading.Event, on_change: Callable[[bool], None] = lambda _: None) -> bool:
        """Blocks until this replica holds the Lease (True) or `stop` is set (False)."""
        announced = False
        while not stop.is_set():
            if self.try_once():
                on_change(True)
                return True
            if not announced and self._seen is not None:
                holder = self._seen.holder
                log.info("waiting for the lease %s/%s, held by %s", self.namespace, self.name, holder)
                announced = True
            stop.wait(self.renew_s)
        return False

    def hold(self, stop: threading.Event, on_lost: Callable[[], None]) -> None:
        """Renews until `stop` is set; calls `on_lost` once renewing failed for `deadline_s`."""
        renewed = time.monotonic()
        while not stop.wait(self.renew_s):
            if self.try_once():
                renewed = time.monotonic()
            elif not self._leading or time.monotonic() - renewed >= self.deadline_s:
                self._leading = False
                on_lost()
                return

    def try_once(self) -> bool:
        """One read and at most one write; True when this replica holds the Lease afterwards."""
        try:
            lease = self._read()
            step = next_step(self._seen, self.me, time.monotonic())
            if step is Step.WAIT:
                self._leading = False
                return False
            self._write(step, lease)
        except ApiException as exc:
            if exc.status not in (404, 409):  # lost a race: decided again on the next try
                log.warning("lease %s/%s: %s %s", self.namespace, self.name, exc.status, exc.reason)
            return False
        except Exception as exc:  # an unreachable API server: keep trying
            log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            return False
        if not self._leading:
            log.info("acquired the lease %s/%s as %s", self.namespace, self.name, self.me)
        self._leading = True
        return True

    def release(self) -> None:
        """Hands the Lease back (empty holder) if still ours: the next replica need not wait."""
        if not self._leading:
            return
        self._leading = False
        try:
            lease = self._read()
            if lease is None or lease.spec.holder_identity != self.me:
                return
            lease.spec.holder_identity = ""
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = _now()
            self.coordination.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=5)
            log.info("released the lease %s/%s", self.namespace, self.name)
        except Exception as exc:  # shutting down: the lease expires on its own
            log.warning("could not release the lease %s/%s: %s", self.namespace, self.name, exc)

    def _read(self) -> Any:
        try:
            lease = self.coordination.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self.renew_s * 2
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            self._seen = None
            return None
        spec = lease.spec
        self._seen = observe(
            self._seen,
            spec.holder_identity or "",
            float(spec.lease_duration_seconds or self.duration_s),
            str(lease.metadata.resource_version),
            time.monotonic(),
        )
        return lease

    def _write(self, step: Step, lease: Any) -> None:
        now = _now()
        timeout = self.renew_s * 2
        if step is Step.CREATE:
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.me,
                    lease_duration_seconds=int(self.duration_s),
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            self.coordination.create_namespaced_lease(self.namespace, body, _request_timeout=timeout)
            return
        spec = lease.spec
        if step is Step.TAKE:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = self.me
        spec.lease_duration_seconds = int(self.duration_s)
        spec.renew_time = now
        # The read's resourceVersion stays in the body: a concurrent write makes this one a 409.
        self.coordination.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=timeout)


def _now() -> datetime:
    return datetime.now(UTC)
