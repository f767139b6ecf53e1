"""The operator's Prometheus metrics. Labels are bounded: namespace, job name, handler, phase."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "finetune_operator_reconciles",
    "Handler invocations.",
    ["handler"],
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "finetune_operator_reconcile_errors",
    "Handler invocations that raised.",
    ["handler"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "finetune_operator_reconcile_duration_seconds",
    "Time spent in a handler.",
    ["handler"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
SYNC_ERRORS = Counter(
    "finetune_operator_sync_errors",
    "Status syncs of one job that raised (the refresh pass goes on with the others).",
    ["namespace", "job"],
    registry=REGISTRY,
)
LEADER = Gauge(
    "finetune_operator_leader",
    "1 on the replica that acts on FineTuneJobs (holds the Lease), 0 on one that only serves the webhook.",
    registry=REGISTRY,
)
JOBS = Gauge("finetune_jobs", "FineTuneJobs by phase.", ["namespace", "phase"], registry=REGISTRY)
JOB_PHASE = Gauge(
    "finetune_job_phase",
    "1 for the current phase of each job.",
    ["namespace", "job", "phase"],
    registry=REGISTRY,
)
JOB_RESTARTS = Counter(
    "finetune_job_restarts",
    "Trainer pods that ended without finishing (preempted, killed, crashed) and were replaced.",
    ["namespace", "job"],
    registry=REGISTRY,
)
TIME_TO_FIRST_STEP = Gauge(
    "finetune_job_time_to_first_step_seconds",
    "Seconds from job creation to its first training step.",
    ["namespace", "job"],
    registry=REGISTRY,
)
CHECKPOINT_AGE = Gauge(
    "finetune_checkpoint_age_seconds",
    "Seconds since the job's last verified checkpoint.",
    ["namespace", "job"],
    registry=REGISTRY,
)
CHECKPOINT_STEP = Gauge(
    "finetune_checkpoint_last_verified_step",
    "Step of the job's last verified checkpoint.",
    ["namespace", "job"],
    registry=REGISTRY,
)
WATCH_STALENESS = Gauge(
    "finetune_operator_watch_staleness_seconds",
    "Seconds since the operator last heard from the API server's watch.",
    registry=REGISTRY,
)

_last_watch_event = time.monotonic()


def serve(port: int) -> None:
    """Starts the /metrics endpoint on all interfaces (the pod's IP in a cluster)."""
    start_http_server(port, registry=REGISTRY)


@contextmanager
def observed(handler: str) -> Iterator[None]:
    """Counts and times one handler invocation, and its errors."""
    RECONCILES.labels(handler).inc()
    RECONCILE_ERRORS.labels(handler)  # exists at 0, so increase() sees the first error
    started = time.monotonic()
    try:
        yield
    except Exception:
        RECONCILE_ERRORS.labels(handler).inc()
        raise
    finally:
        RECONCILE_DURATION.labels(handler).observe(time.monotonic() - started)


def watch_event_seen() -> None:
    global _last_watch_event
    _last_watch_event = time.monotonic()
    WATCH_STALENESS.set(0)


def refresh_watch_staleness() -> None:
    WATCH_STALENESS.set(time.monotonic() - _last_watch_event)


def set_job_phase(namespace: str, job: str, phase: str, phases: list[str]) -> None:
    for candidate in phases:
        JOB_PHASE.labels(namespace, job, candidate).set(1 if candidate == phase else 0)


def forget_job(namespace: str, job: str, phases: list[str]) -> None:
    """Drops a deleted job's series so dashboards do not show ghosts."""
    for gauge in (TIME_TO_FIRST_STEP, CHECKPOINT_AGE, CHECKPOINT_STEP):
        _remove(gauge, namespace, job)
    _remove(JOB_RESTARTS, namespace, job)
    _remove(SYNC_ERRORS, namespace, job)
    for phase in phases:
        _remove(JOB_PHASE, namespace, job, phase)


def _remove(metric: Gauge | Counter, *labels: str) -> None:
    with suppress(KeyError):
        metric.remove(*labels)
