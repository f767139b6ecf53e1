"""How one operator process runs, alone or as one of several replicas.

Two kopf instances share the process, each with its own registry and event loop:

- serving (every replica, from the start): /healthz with its probes and the admission webhook, so
  FineTuneJobs can be created while any replica is up;
- acting (kopf's default registry, the handlers): only on the replica that holds the Lease (or at
  once when leader election is off). It runs in the main thread, where kopf handles SIGTERM.

A replica that loses the Lease exits at once rather than finishing its work: another one may take
over as soon as the lease expires, and everything the handlers do is level-based, so the next
leader picks up where this one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from typing import Any

import kopf
from kubernetes import client

from finetune_operator import admission, leader, metrics
from finetune_operator.kube import connect
from finetune_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

SERVING = kopf.OperatorRegistry()
_acting = threading.Event()


@kopf.on.startup(registry=SERVING)
def configure_serving(settings: kopf.OperatorSettings, **_: Any) -> None:
    operator_settings = OperatorSettings()
    settings.scanning.disabled = True  # the resource is known; the chart grants no CRD listing
    settings.posting.enabled = False  # events come from the acting instance only
    if operator_settings.webhook_port:
        admission.serve(settings, SERVING, operator_settings.webhook_port, operator_settings.webhook_cert_dir)


@kopf.on.login(registry=SERVING)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """A registry made by hand gets no login handler of kopf's own: the same as the default one."""
    return kopf.login_via_client(**kwargs)


@kopf.on.probe(id="leader", registry=SERVING)
def leading(**_: Any) -> bool:
    return _acting.is_set()


class Stop(threading.Event):
    """One stop for the whole process, and for each kopf instance an asyncio.Event in its own loop
    (kopf waits for any other kind of flag in an executor thread, which asyncio.run then waits for
    forever at shutdown)."""

    def __init__(self) -> None:
        super().__init__()
        self._flags: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._guard = threading.Lock()

    def set(self) -> None:
        with self._guard:
            super().set()
            for loop, flag in self._flags:
                with contextlib.suppress(RuntimeError):  # that loop has finished already
                    loop.call_soon_threadsafe(flag.set)

    def flag(self) -> asyncio.Event:
        """An event of the running loop, set when the process stops."""
        flag = asyncio.Event()
        with self._guard:
            if self.is_set():
                flag.set()
            self._flags.append((asyncio.get_running_loop(), flag))
        return flag


class _SignalsElsewhere(logging.Filter):
    """The serving instance runs in a thread; the process's signals are handled in the main thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "OS signals are ignored" not in record.getMessage()


def run(settings: OperatorSettings) -> int:
    """Serves, waits for the Lease if there is an election, then acts until stopped. Exit status."""
    stop = Stop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # until kopf installs its own handlers
        signal.signal(sig, lambda *_: stop.set())
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    logging.getLogger("kopf._core.reactor.running").addFilter(_SignalsElsewhere())
    serving = _Instance("serving", SERVING, settings, stop, liveness=True)
    serving.start()
    elector = _elector(settings)
    try:
        if elector is not None and not elector.acquire(stop):
            return serving.wait()
        _acting.set()
        metrics.LEADER.set(1)
        if elector is not None:
            threading.Thread(target=elector.hold, args=(stop, _lost), name="lease", daemon=True).start()
        acting = _run_kopf(kopf.get_default_registry(), settings, stop, liveness=False)
    finally:
        stop.set()
        _acting.clear()
        metrics.LEADER.set(0)
        if elector is not None:
            elector.release()
    return max(acting, serving.wait())


def _elector(settings: OperatorSettings) -> leader.Elector | None:
    if not settings.leader_election_namespace:
        return None
    duration = settings.leader_election_seconds
    return leader.Elector(
        coordination=client.CoordinationV1Api(connect()),
        namespace=settings.leader_election_namespace,
        name=settings.leader_election_lease,
        me=leader.identity(),
        duration_s=duration,
        renew_s=max(duration / 7.5, 0.4),
        deadline_s=duration * 2 / 3,
    )


def _lost() -> None:
    """Another replica may act from the moment the lease expires: stop acting now."""
    log.error("lost the leader lease: exiting so that only the new leader acts")
    logging.shutdown()
    os._exit(1)


def _run_kopf(
    registry: kopf.OperatorRegistry, settings: OperatorSettings, stop: Stop, *, liveness: bool
) -> int:
    endpoint = f"http://0.0.0.0:{settings.health_port}/healthz" if liveness and settings.health_port else None

    async def operate() -> None:
        await kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not settings.watched_namespaces(),
            namespaces=settings.watched_namespaces(),
            liveness_endpoint=endpoint,
            stop_flag=stop.flag(),
        )

    try:
        asyncio.run(operate())
    except Exception:
        log.exception("the operator stopped on an error")
        return 1
    return 0


class _Instance(threading.Thread):
    """A kopf instance in its own thread; when it ends, for any reason, the process stops."""

    def __init__(
        self,
        name: str,
        registry: kopf.OperatorRegistry,
        settings: OperatorSettings,
        stop: Stop,
        *,
        liveness: bool,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self._args = (registry, settings, stop)
        self._liveness = liveness
        self.status = 0

    def run(self) -> None:
        registry, settings, stop = self._args
        try:
            self.status = _run_kopf(registry, settings, stop, liveness=self._liveness)
        finally:
            stop.set()

    def wait(self) -> int:
        self.join(timeout=30)
        return self.status
