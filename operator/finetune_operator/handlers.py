"""kopf handlers: the only code that talks to the API server. Each one gathers facts, asks
`policy`/`builders`/`status` what to do, and does it.

Two flows:
- spec -> children: on create/update/resume, validate and preflight the spec, then apply the
  ConfigMaps, RBAC, Service and Job (`reconcile`).
- children -> status: on any change of the Job, its pods or the progress ConfigMap, recompute the
  job's status from them (`sync_status`), level-based and idempotent.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from finetune_operator import api, builders, launched, metrics, model_info, policy
from finetune_operator import status as st
from finetune_operator.api import Phase
from finetune_operator.kube import Kube, connect
from finetune_operator.replicas import SERVING
from finetune_operator.settings import OperatorSettings

log = logging.getLogger("finetune_operator")
PHASES = [p.value for p in Phase]
MANAGED = {"app.kubernetes.io/managed-by": "finetune-operator"}
_state: dict[str, Any] = {}


def _settings() -> OperatorSettings:
    return _state["settings"]  # type: ignore[no-any-return]


def _kube() -> Kube:
    return _state["kube"]  # type: ignore[no-any-return]


EVENT_REPEAT_S = 600.0  # the same event about the same job is posted at most once in this window
MAX_REMEMBERED_EVENTS = 10_000
_events_posted: dict[tuple[str, str, str], float] = {}


def _event(body: Mapping[str, Any], kind: str, *, reason: str, message: str) -> None:
    """A Kubernetes event on the FineTuneJob. Posted directly (not through kopf's queue) so the
    periodic refresh thread can post too; a failed post is logged, never fatal. A repeat of the
    last few minutes (a handler retried, a refused spec handled again) is not posted again."""
    key, now = (str(body["metadata"].get("uid")), reason, message), time.monotonic()
    with _events_guard:
        if now - _events_posted.get(key, -EVENT_REPEAT_S) < EVENT_REPEAT_S:
            return
        if len(_events_posted) > MAX_REMEMBERED_EVENTS:  # forget what is out of the window anyway
            for old in [k for k, at in _events_posted.items() if now - at >= EVENT_REPEAT_S]:
                del _events_posted[old]
        _events_posted[key] = now
    try:
        _kube().event(body, kind, reason, message)
    except Exception:
        log.warning("could not post event %s for %s", reason, body["metadata"].get("name"), exc_info=True)


_events_guard = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Start-up


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    operator_settings = OperatorSettings()
    logging.getLogger().setLevel(operator_settings.log_level)
    # Silent dead watches are a known failure: make the server end them and the client notice.
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 10
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="finetune.dev")
    settings.persistence.diffbase_storage = SpecFingerprintStorage(
        prefix="finetune.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    # The chart grants no access to CRDs cluster-wide; the resource is known, no scanning needed.
    # Skipped namespaces (globs) need it: kopf then lists and watches namespaces (and CRDs).
    settings.scanning.disabled = not operator_settings.skip_namespaces
    _state["settings"] = operator_settings
    _state["kube"] = Kube(connect())
    stop = threading.Event()
    _state["stop"], _state["started"] = stop, time.monotonic()
    # copy_context: events posted from the loop reach kopf's event queue like a handler's would.
    refresher = contextvars.copy_context()
    threading.Thread(target=refresher.run, args=(refresh_forever, stop), name="refresh", daemon=True).start()
    log.info("finetune-operator starting: %s", _runtime_flags(operator_settings))


class SpecFingerprintStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf keeps the last handled spec in an annotation, to tell what changed; a spec at the
    schema's maximum sizes (about 1 MB of prompts, scenarios and env) would not fit in the 256 KiB
    that all annotations share. The handlers only need to know which field changed, so a short hash
    of each field (`launched.fingerprints`) stands in for the spec."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        essence = super().build(body=body, extra_fields=extra_fields)
        return {"spec": launched.fingerprints(essence.get("spec") or {}, mutable=True)}


def _runtime_flags(settings: OperatorSettings) -> str:
    """Start-up diagnostics: settings only (they hold no secrets)."""
    fields = settings.model_dump(mode="json")
    fields["namespaces"] = ",".join(settings.namespaces) or "(all)"
    return " ".join(f"{k}={v}" for k, v in sorted(fields.items()))


# ---------------------------------------------------------------------------------------------
# spec -> children


@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, field="spec")
def reconcile(body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, **_: Any) -> None:
    metrics.watch_event_seen()
    with metrics.observed("reconcile"):
        _reconcile(dict(body), dict(meta), dict(spec))


def _reconcile(body: dict[str, Any], meta: dict[str, Any], raw_spec: dict[str, Any]) -> None:
    namespace, name, generation = meta["namespace"], meta["name"], int(meta.get("generation", 1))
    live = _kube().read_job_resource(namespace, name)
    if live is None or live["metadata"]["uid"] != meta["uid"]:
        # This body is of a deleted job: its children would be owned by a dead uid and collected.
        log.info("%s/%s: uid %s is gone; leaving its children to the live job", namespace, name, meta["uid"])
        return
    status = live.get("status") or {}
    if st.finished_run(status) and status.get("observedGeneration") == generation:
        return  # finished, and this spec handled already (an operator restart): nothing to do
    existing = _kube().read_job(namespace, builders.child_names(name).job)
    if existing is not None and builders.foreign_owner(existing, meta["uid"]) is None:
        _reconcile_launched(live, raw_spec, existing)
        return
    if st.finished_run(live.get("status") or {}):
        # Its Job was deleted since: a finished run is never started again.
        log.info("%s/%s has finished (%s); nothing to launch", namespace, name, live["status"]["phase"])
        _update_status(namespace, name, lambda fresh: st.status_patch(generation=generation), first=live)
        return
    try:
        spec = api.parse_spec(raw_spec)
    except ValidationError as exc:
        _refuse_spec(body, namespace, name, generation, exc)
        return
    preflight, secret_versions = _preflight(spec, namespace)
    for finding in preflight.warnings:
        _event(body, "Warning", reason=finding.reason, message=finding.message)
    if preflight.refused:
        _refuse_preflight(body, namespace, name, generation, preflight)
        return

    def build(fresh: dict[str, Any]) -> dict[str, Any]:
        old = fresh.get("status") or {}
        patch = st.status_patch(
            generation=generation,
            conditions=_preflight_conditions(old, preflight, generation),
            decision=preflight.decision,
            phase=Phase.SUSPENDED if spec.suspend else None,
            launchTime=datetime.now(UTC),
        )
        if "phase" not in patch and not old.get("phase"):
            patch["phase"] = Phase.PENDING.value
        if EARLIER_JOB in str(old.get("message") or ""):
            patch["message"] = ""  # its own children exist now
        return patch

    # The decision is in status before the Job exists: an operator killed in between leaves a
    # launched job whose method the next leader reads, never one it would have to decide again.
    _create_children(
        meta,
        raw_spec,
        spec,
        preflight,
        secret_versions,
        existing,
        before_job=lambda: _update_status(namespace, name, build, first=live),
    )
    _event(body, "Normal", reason="MethodChosen", message=preflight.decision.reason)


def _reconcile_launched(body: dict[str, Any], raw_spec: Mapping[str, Any], job: Mapping[str, Any]) -> None:
    """After launch the method, the memory plan and the trainer's config stay as they were decided
    (no second preflight: a new node label or operator setting never flips a running job, and a
    finished job stays finished whatever happened to its Secrets since). Only spec.suspend is
    applied; any other change is reported (`launched`)."""
    meta = body["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], int(meta.get("generation", 1))
    recorded = launched.recorded(job)
    changed = launched.changed_fields(recorded, raw_spec) if recorded is not None else []
    if changed:
        _event(body, "Warning", reason="SpecChangeIgnored", message=launched.change_message(changed))
    finished = st.phase_from_job(job.get("status")) in (Phase.SUCCEEDED, Phase.FAILED)
    suspend = bool(raw_spec.get("suspend"))
    if not finished:
        _restore_children(body, job)
        if bool(job["spec"].get("suspend")) != suspend:
            _kube().patch_job_suspend(namespace, job["metadata"]["name"], suspend)

    def build(fresh: dict[str, Any]) -> dict[str, Any]:
        applied = st.condition(
            "SpecApplied",
            not changed,
            "ChangedAfterLaunch" if changed else "Applied",
            launched.change_message(changed) if changed else "the spec is the one the job launched with",
            generation=generation,
            now=st.utcnow(),
        )
        old = fresh.get("status") or {}
        conditions = st.set_condition(list(old.get("conditions") or []), applied)
        phase = Phase.SUSPENDED if suspend and not finished else None
        # Jobs launched before status.launchTime existed get it from their Job.
        since = {} if old.get("launchTime") else {"launchTime": job["metadata"].get("creationTimestamp")}
        return st.status_patch(generation=generation, conditions=conditions, phase=phase, **since)

    _update_status(namespace, name, build)


def _restore_children(body: Mapping[str, Any], job: Mapping[str, Any]) -> None:
    """Level-based: a child of a running job that is gone (deleted by hand, or collected while
    the job was being re-created) is made again as it was launched, from the method recorded in
    status; the Job's pods need their ServiceAccount and ConfigMaps to start."""
    decision = launched.decision_from_status(body.get("status") or {})
    try:
        spec = api.parse_spec(body["spec"])
    except ValidationError:
        return
    if decision is None:
        return
    ref = builders.JobRef.from_metadata(body["metadata"])
    cloud = launched.launched_in_cloud(job)
    children, problem = launched.restorable(
        builders.build_children(ref, spec, decision, _settings(), is_cloud=cloud), job
    )
    restored = [f"{c['kind']} {c['metadata']['name']}" for c in children if _kube().create_if_absent(c)]
    if restored:
        message = f"re-created {', '.join(restored)}: deleted while the job ran"
        _event(body, "Normal", reason="ChildRestored", message=message)
    if problem:
        _event(body, "Warning", reason="ChildNotRestored", message=problem)


def _restore_after_deletion(meta: Mapping[str, Any]) -> None:
    """A deleted ConfigMap of a live, launched job comes back at once (the operator watches
    ConfigMaps); other children on the next restoring pass of the refresh loop."""
    owner, namespace = _owner_name(meta), meta.get("namespace")
    if not owner or not namespace:
        return
    body = _kube().read_job_resource(str(namespace), owner)
    if body is not None and builders.foreign_owner(dict(meta), body["metadata"]["uid"]) is None:
        _restore_if_running(body)


def _restore_if_running(body: Mapping[str, Any]) -> None:
    meta = body["metadata"]
    job = _kube().read_job(meta["namespace"], builders.child_names(meta["name"]).job)
    if job is None or builders.foreign_owner(job, meta["uid"]) is not None:
        return  # its job is gone too (garbage collection), or not launched: reconcile owns it
    if meta.get("deletionTimestamp") or job["metadata"].get("deletionTimestamp"):
        return  # being deleted: its children go first (foreground deletion)
    if st.phase_from_job(job.get("status")) not in (Phase.SUCCEEDED, Phase.FAILED):
        with metrics.observed("restore_children"):
            _restore_children(body, job)


def _preflight_conditions(
    old: Mapping[str, Any], preflight: policy.Preflight, generation: int
) -> list[dict[str, Any]]:
    now = st.utcnow()
    valid = st.condition("SpecValid", True, "Valid", "spec is valid", generation=generation, now=now)
    conditions = st.set_condition(list(old.get("conditions") or []), valid)
    return st.merge_findings(conditions, preflight.findings, generation=generation, now=now)


@dataclass
class Plan:
    """A status patch and what to do once it is written (events, suspending or resuming the Job,
    metrics). A write that meets a conflict is planned again from a fresh read, so an action runs
    only for the plan whose status was written: never twice, never on a stale decision."""

    patch: dict[str, Any]
    actions: list[Callable[[], None]] = field(default_factory=list)


def _update_status(
    namespace: str,
    name: str,
    build: Callable[[dict[str, Any]], dict[str, Any] | Plan | None],
    first: dict[str, Any] | None = None,
) -> None:
    """Builds a status patch from a fresh read (or `first`, read just before) and writes it only if
    nothing changed in between: the operator's handlers run concurrently, and a merge patch
    replaces whole lists (conditions)."""
    for attempt in range(5):
        body = first if attempt == 0 and first is not None else _kube().read_job_resource(namespace, name)
        if body is None:
            return
        built = build(body)
        plan = built if isinstance(built, Plan) else Plan(built or {})
        written = not plan.patch or _kube().patch_status(
            namespace, name, plan.patch, body["metadata"]["resourceVersion"]
        )
        if written:
            for action in plan.actions:
                action()
            return
    raise kopf.TemporaryError(f"status of {namespace}/{name} kept changing; retrying", delay=2)


def _preflight(spec: api.FineTuneJobSpec, namespace: str) -> tuple[policy.Preflight, dict[str, str]]:
    """The checks before launch, and the resourceVersion of each referenced Secret (for the hash
    that tells a rotation later)."""
    names = {ref.name for ref in policy.required_secrets(spec)}
    versions: dict[str, str] = {}
    if _settings().check_secrets:
        secret_keys, versions = _kube().secret_keys(namespace, names)
    else:  # not allowed to read Secrets: pods wait for missing ones instead (FailedMount events)
        secret_keys = {ref.name: {ref.key} for ref in policy.required_secrets(spec)}
    labels, provider_ids = _node_labels() if _settings().read_nodes else ([], [])
    cloud = policy.looks_like_cloud(labels, provider_ids)
    # Without spec.model.parameters, the size comes from the model's own files (cached, short timeouts).
    size = model_info.look_up(spec, _settings(), model_info.secret_reader(_kube(), namespace))
    preflight = policy.preflight(
        spec, _settings(), namespace=namespace, secret_keys=secret_keys, cloud_detected=cloud, model_size=size
    )
    return preflight, versions


NODE_LABELS_TTL_S = 60.0  # nodes' labels change rarely; a burst of new jobs reads them once


def _node_labels() -> tuple[list[dict[str, str]], list[str]]:
    with _node_labels_guard:
        cached = _state.get("node_labels")
        if cached is None or time.monotonic() - cached[0] > NODE_LABELS_TTL_S:
            cached = (time.monotonic(), _kube().node_labels())
            _state["node_labels"] = cached
        return cached[1]


_node_labels_guard = threading.Lock()
EARLIER_JOB = "of an earlier FineTuneJob"


def _wait_for_collection(meta: Mapping[str, Any], child: Mapping[str, Any], other: str) -> None:
    live = next(
        (j for j in _kube().list_job_resources((meta["namespace"],)) if j["metadata"]["uid"] == other), None
    )
    if live is not None and live["metadata"]["name"] != meta["name"]:
        _refuse_name_collision(meta, child, live["metadata"]["name"])
    message = (
        f"waiting for {child['kind']} {child['metadata']['name']} {EARLIER_JOB} "
        f"{meta['name']} (uid {other}) to be deleted by the garbage collector; this job's own is "
        "created then"
    )
    _set_phase(meta, Phase.PENDING, message)
    raise kopf.TemporaryError(message, delay=3)


def _refuse_name_collision(meta: Mapping[str, Any], child: Mapping[str, Any], other: str) -> None:
    """Child names are the job's name made a DNS label: `a.b` and `a-b` would share them."""
    message = (
        f"metadata.name {meta['name']!r}: its {child['kind']} would be named "
        f"{child['metadata']['name']!r}, which FineTuneJob {other!r} already uses (fix: rename this "
        "job; names that differ only in '.' and '-' share their children's names)"
    )
    _set_phase(meta, Phase.FAILED, message)
    _event({"metadata": meta}, "Warning", reason="NameCollision", message=message)
    raise kopf.PermanentError(message)


def _set_phase(meta: Mapping[str, Any], phase: Phase, message: str) -> None:
    generation = int(meta.get("generation", 1))
    _update_status(
        meta["namespace"],
        meta["name"],
        lambda fresh: st.status_patch(generation=generation, phase=phase, message=message),
    )


def _create_children(
    meta: Mapping[str, Any],
    raw_spec: Mapping[str, Any],
    spec: api.FineTuneJobSpec,
    preflight: policy.Preflight,
    secret_versions: Mapping[str, str],
    existing_job: Mapping[str, Any] | None,
    before_job: Callable[[], None],
) -> None:
    """Before launch, in creation order, the Job last (carrying the fingerprints of the spec it
    launches with), `before_job` called right before it. Each child is created; one of that name
    that exists already is looked at: a child of another FineTuneJob (one deleted a moment ago,
    whose children the garbage collector has not removed yet) is never adopted, the job waits
    until it is gone; its own, left by an
    earlier attempt that was refused, is brought up to date."""
    job = builders.JobRef.from_metadata(meta)
    children = builders.build_children(
        job,
        spec,
        preflight.decision,
        _settings(),
        is_cloud=preflight.is_cloud,
        secret_versions=secret_versions,
    )
    keep_as_is = {"Job", builders.child_names(job.name).progress}  # launched, or written by the trainer
    for child in children:
        if child["kind"] == "Job":
            child["metadata"].setdefault("annotations", {}).update(launched.annotation(raw_spec))
            before_job()
        if _kube().create_if_absent(child):
            continue
        found = existing_job if child["kind"] == "Job" and existing_job is not None else _kube().read(child)
        other = builders.foreign_owner(found, job.uid)
        if other is not None:
            _wait_for_collection(meta, child, other)
        if not keep_as_is & {child["kind"], child["metadata"]["name"]}:
            _kube().apply(child)


def _refuse_spec(
    body: dict[str, Any], namespace: str, name: str, generation: int, exc: ValidationError
) -> None:
    message = "; ".join(_validation_messages(exc))
    _event(body, "Warning", reason="InvalidSpec", message=message)

    def build(fresh: dict[str, Any]) -> dict[str, Any]:
        now = st.utcnow()
        condition = st.condition("SpecValid", False, "InvalidSpec", message, generation=generation, now=now)
        conditions = st.set_condition(list((fresh.get("status") or {}).get("conditions") or []), condition)
        return st.status_patch(
            generation=generation, phase=Phase.FAILED, conditions=conditions, message=message
        )

    _update_status(namespace, name, build)


def _validation_messages(exc: ValidationError) -> list[str]:
    out = []
    for error in exc.errors():
        path = "spec." + ".".join(str(p) for p in error["loc"])
        out.append(f"{path}: {error['msg']} (got {str(error.get('input'))[:80]!r})")
    return out


def _refuse_preflight(
    body: dict[str, Any], namespace: str, name: str, generation: int, preflight: policy.Preflight
) -> None:
    for finding in preflight.refused:
        _event(body, "Warning", reason=finding.reason, message=finding.message)
    secrets_missing = any(f.condition == "SecretsReady" for f in preflight.refused)
    message = "; ".join(f.message for f in preflight.refused)

    def build(fresh: dict[str, Any]) -> dict[str, Any]:
        # Missing secrets may still be created: wait for them. Anything else needs a spec change.
        return st.status_patch(
            generation=generation,
            phase=Phase.PENDING if secrets_missing else Phase.FAILED,
            conditions=_preflight_conditions(fresh.get("status") or {}, preflight, generation),
            decision=preflight.decision,
            message=message,
        )

    _update_status(namespace, name, build)
    if secrets_missing:
        raise kopf.TemporaryError(message, delay=5)


# ---------------------------------------------------------------------------------------------
# children -> status


def _owner_name(meta: Mapping[str, Any]) -> str | None:
    for owner in meta.get("ownerReferences") or []:
        if owner.get("kind") == api.KIND and owner.get("apiVersion", "").startswith(api.GROUP):
            return str(owner["name"])
    return None


def _owner_through_job(meta: Mapping[str, Any]) -> str | None:
    """A pod belongs to a Job, which belongs to the FineTuneJob."""
    for owner in meta.get("ownerReferences") or []:
        if owner.get("kind") == "Job":
            job = _kube().read_job(str(meta["namespace"]), str(owner["name"]))
            return _owner_name(job["metadata"]) if job else None
    return None


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
@kopf.on.event("", "v1", "configmaps", labels=MANAGED)
@kopf.on.event("", "v1", "pods", labels=MANAGED)
def child_changed(type: str, meta: kopf.Meta, resource: kopf.Resource, **_: Any) -> None:
    metrics.watch_event_seen()
    if meta.get("name") == HEARTBEAT and meta.get("namespace") == _settings().heartbeat_namespace:
        _state["heartbeat_seen"] = time.monotonic()
        return
    if type == "DELETED" and resource.plural == "configmaps":
        _restore_after_deletion(meta)
    owner = _owner_name(meta) or _owner_through_job(meta)
    if owner and meta.get("namespace"):
        with metrics.observed("sync_status"):
            sync_status(str(meta["namespace"]), owner)


RESTORE_EVERY_PASSES = 2  # missing children of running jobs are looked for every other pass


def refresh_forever(stop: threading.Event, interval: float = 15.0) -> None:
    """Catches anything a missed event left behind, and keeps time-based metrics current.
    A plain loop rather than a kopf timer: timers put a finalizer on every FineTuneJob, which
    would block deleting jobs once the operator is uninstalled."""
    while not stop.wait(interval):
        metrics.refresh_watch_staleness()
        _beat()
        try:
            with metrics.observed("refresh"):
                settings = _settings()
                listed = _kube().list_job_resources(settings.namespaces)
                items = [i for i in listed if not settings.skips(i["metadata"]["namespace"])]
                _state["last_refresh"] = time.monotonic()  # the API server answers; the pass goes on
                restoring = _state.setdefault("passes", 0) % RESTORE_EVERY_PASSES == 0
                _state["passes"] += 1
                for item in items:
                    namespace, name = item["metadata"]["namespace"], item["metadata"]["name"]
                    if needs_refresh(item):
                        _sync_one(namespace, name, item if restoring else None)
                    else:  # from the listing: no request
                        metrics.set_job_phase(namespace, name, item["status"]["phase"], PHASES)
                _update_fleet_gauge(items)
        except Exception:
            log.exception("periodic refresh failed; retrying in %.0fs", interval)


def needs_refresh(item: Mapping[str, Any]) -> bool:
    """A finished job's status no longer changes: it costs no request per pass."""
    return not st.finished_run(item.get("status") or {})


def _sync_one(namespace: str, name: str, restore: Mapping[str, Any] | None = None) -> None:
    """One job's failure is logged and counted; the pass goes on with the others. With `restore`
    (the job as listed), missing children of a running job are made again first."""
    try:
        if restore is not None and (restore.get("status") or {}).get("method"):
            _restore_if_running(restore)
        sync_status(namespace, name)
    except Exception:
        metrics.SYNC_ERRORS.labels(namespace, name).inc()
        log.exception("%s/%s: status sync failed; retrying on the next pass", namespace, name)


_sync_locks: dict[tuple[str, str], threading.Lock] = {}
_sync_locks_guard = threading.Lock()


def _sync_lock(namespace: str, name: str) -> threading.Lock:
    with _sync_locks_guard:
        return _sync_locks.setdefault((namespace, name), threading.Lock())


def sync_status(namespace: str, name: str) -> None:
    """Recomputes the job's status from its Job, pods and progress report, and patches it.
    One sync per job at a time: event handlers and the refresh loop run concurrently, and a sync
    acting on a stale read (suspending a Job for a rotation already handled) would undo another."""
    with _sync_lock(namespace, name):
        _sync_status(namespace, name)


def _sync_status(namespace: str, name: str) -> None:
    names = builders.child_names(name)

    def build(body: dict[str, Any]) -> Plan | None:
        # Read after the job itself, on every try: a plan never acts on an older Job than its status.
        job = _kube().read_job(namespace, names.job)
        uid = body["metadata"]["uid"]
        if job is None or "spec" not in body or builders.foreign_owner(job, uid) is not None:
            return None  # not launched yet (`reconcile` owns the status), or a deleted job's Job
        progress = _kube().config_map(namespace, names.progress)
        own_progress = progress if builders.foreign_owner(progress, uid) is None else None
        report = st.parse_report(((own_progress or {}).get("data") or {}).get("progress.json"))
        pods = _kube().pods_of(namespace, uid, builders.JOB_UID_LABEL)
        old = body.get("status") or {}
        patch = _status_from_children(body, job, report, pods)
        actions = [*_secret_actions(body, job, patch), lambda: _record_metrics(body, patch)]
        if st.pods_missing(job, pods, st.utcnow()):  # a missing ServiceAccount would keep them out
            actions.append(lambda: _restore_children(body, job))
        if not _changed(old, patch):
            return Plan({}, actions)
        return Plan(patch, [*actions, lambda: _announce(body, old, patch, pods)])

    _update_status(namespace, name, build)


def _secret_actions(
    body: Mapping[str, Any], job: Mapping[str, Any], patch: dict[str, Any]
) -> list[Callable[[], None]]:
    """Secrets of a running job: a rotated one restarts training gracefully (the Job is suspended,
    the trainer commits a checkpoint on SIGTERM, then it is resumed and the new pods read the new
    values); a deleted one is reported, and the running pods keep going. Fills `patch`, returns the
    Job changes to make once it is written."""
    meta = body["metadata"]
    if not _settings().check_secrets or patch.get("phase") in (Phase.SUCCEEDED.value, Phase.FAILED.value):
        return []  # a finished job no longer needs its Secrets
    try:
        spec = api.parse_spec(body["spec"])
    except ValidationError:
        return []
    names = {ref.name for ref in policy.required_secrets(spec)}
    if not names:
        return []
    versions = _kube().secret_keys(meta["namespace"], names)[1]
    annotations = ((job["spec"].get("template") or {}).get("metadata") or {}).get("annotations") or {}
    old = body.get("status") or {}
    facts = st.SecretFacts(
        names=sorted(names),
        missing=sorted(names - set(versions)),
        current=builders.secret_versions_hash(versions),
        recorded=old.get("secretsHash") or annotations.get(builders.SECRETS_HASH_ANNOTATION),
        restarting=_condition(old.get("conditions"), "SecretsRotated").get("reason") == "Restarting",
        job_suspended=bool(job["spec"].get("suspend")),
        job_active=bool((job.get("status") or {}).get("active")),
        user_suspended=spec.suspend,
        secrets_ready_false=_condition(old.get("conditions"), "SecretsReady").get("status") == "False",
    )
    step = st.secret_step(facts)
    _apply_secret_step(step, body, patch)
    actions: list[Callable[[], None]] = []
    suspend, job_name = step.suspend_job, job["metadata"]["name"]
    if suspend is not None:
        actions.append(lambda: _kube().patch_job_suspend(meta["namespace"], job_name, suspend))
    if step.event:
        actions.append(lambda: _event(body, "Normal", reason="SecretRotated", message=step.event))
    if step.warning:
        actions.append(lambda: _event(body, "Warning", reason="SecretMissing", message=step.warning))
    return actions


def _apply_secret_step(step: st.SecretStep, body: Mapping[str, Any], patch: dict[str, Any]) -> None:
    generation, now = int(body["metadata"].get("generation", 1)), st.utcnow()
    for type_, status, reason, message in step.conditions:
        new = st.condition(type_, status, reason, message, generation=generation, now=now)
        patch["conditions"] = st.set_condition(patch["conditions"], new)
    if step.secrets_hash is not None:
        patch["secretsHash"] = step.secrets_hash
    if step.phase is not None:
        patch["phase"] = step.phase.value


def _condition(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any]:
    """The condition of that type, or an empty one."""
    return next((c for c in conditions or [] if c.get("type") == type_), {})


def _status_from_children(
    body: Mapping[str, Any],
    job: Mapping[str, Any],
    report: Any,
    pods: list[dict[str, Any]],
) -> dict[str, Any]:
    generation = int(body["metadata"].get("generation", 1))
    old = body.get("status") or {}
    patch: dict[str, Any] = st.status_from_report(report, old) if report is not None else {}
    reported = report.phase.value if report is not None else None
    phase = st.phase_from_job(job.get("status"), reported, old.get("phase"))
    patch["phase"] = phase.value
    nodes = int(((body.get("spec") or {}).get("resources") or {}).get("nodes") or 1)
    restarts = int(old.get("restarts") or 0)
    patch["restarts"] = st.restarts_from_job(job.get("status") or {}, phase, nodes, restarts)
    # observedGeneration is the reconcile's to write: it says which spec the operator has handled.
    started = _first_start(pods)
    if started and not old.get("startTime"):
        patch["startTime"] = started
    conditions = list(old.get("conditions") or [])
    now = st.utcnow()
    if phase in (Phase.SUCCEEDED, Phase.FAILED):
        if not old.get("completionTime"):
            patch["completionTime"] = st._timestamp(now)
        reason, message = _outcome(job, pods, phase, report.message if report is not None else "")
        patch["message"] = message[: st.MAX_MESSAGE]
        conditions = st.set_condition(
            conditions,
            st.condition(
                "Complete", phase == Phase.SUCCEEDED, reason, message, generation=generation, now=now
            ),
        )
    conditions = _pods_created_condition(job, pods, conditions, generation, now)
    refused = _condition(conditions, "PodsCreated")
    if refused.get("status") == "False" and phase == Phase.PENDING:
        patch["message"] = refused["message"]
    conditions = _data_condition(body, report, conditions, generation, now)
    conditions = _predictions_condition(report, conditions, generation, now)
    patch["conditions"] = conditions
    return patch


def _pods_created_condition(
    job: Mapping[str, Any],
    pods: list[dict[str, Any]],
    conditions: list[dict[str, Any]],
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """PodsCreated=False while the Job controller is refused (read from its events only then)."""
    if st.pods_missing(job, pods, now):
        refusals = _kube().job_refusals(job["metadata"]["namespace"], job["metadata"]["uid"])
        return st.set_condition(conditions, st.pods_condition(refusals, generation=generation, now=now))
    if pods and _condition(conditions, "PodsCreated").get("status") == "False":
        return st.set_condition(conditions, st.pods_condition([], generation=generation, now=now))
    return conditions


def _data_condition(
    body: Mapping[str, Any], report: Any, conditions: list[dict[str, Any]], generation: int, now: datetime
) -> list[dict[str, Any]]:
    """Applies the small-data rule once the trainer has counted the examples."""
    if report is None or report.data is None or report.method is None or not report.data.examples:
        return conditions
    spec = body["spec"]
    allow = bool((spec.get("method") or {}).get("allowSmallDataFullFineTune"))
    try:
        method = api.ResolvedMethodType(report.method.type)
    except ValueError:
        return conditions
    finding = policy.check_data_size(method, report.data.examples, allow_small=allow)
    return st.merge_findings(conditions, [finding], generation=generation, now=now)


def _predictions_condition(
    report: Any, conditions: list[dict[str, Any]], generation: int, now: datetime
) -> list[dict[str, Any]]:
    """PredictionsHealthy: the sample generations of the last evaluation passed their checks."""
    if report is None or report.predictions is None:
        return conditions
    predictions = report.predictions
    failing = sorted(check.name for check in predictions.checks if not check.passed)
    healthy = predictions.failed == 0
    reason = "ChecksPassed" if healthy else "ChecksFailed"
    message = (
        f"{predictions.passed} prediction checks passed"
        if healthy
        else f"{predictions.failed} prediction checks failed: {', '.join(failing) or 'see the trainer log'}"
    )
    new = st.condition("PredictionsHealthy", healthy, reason, message, generation=generation, now=now)
    return st.set_condition(conditions, new)


def _first_start(pods: list[dict[str, Any]]) -> str | None:
    times = sorted(str(p["status"]["startTime"]) for p in pods if (p.get("status") or {}).get("startTime"))
    return times[0] if times else None


def _exit(pod: Mapping[str, Any]) -> tuple[int, str] | None:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            return int(terminated.get("exitCode", 0)), str(terminated.get("message") or "")
    return None


def _outcome(
    job: Mapping[str, Any], pods: list[dict[str, Any]], phase: Phase, reported: str = ""
) -> tuple[str, str]:
    """The condition reason and message for a finished job: the exit code's meaning, with the
    trainer's own words (its termination message, else its last report)."""
    if phase == Phase.SUCCEEDED:  # the trainer's notes (merged weights, warnings) stay visible
        done = "training finished and the success criteria were met"
        return "Succeeded", f"training finished: {reported.strip()}" if reported.strip() else done
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: str((p.get("status") or {}).get("startTime") or ""))
    exit_info = _exit(failed[-1]) if failed else None
    if exit_info is None:
        cond: dict[str, Any] = next(
            (c for c in (job.get("status") or {}).get("conditions") or [] if c.get("type") == "Failed"), {}
        )
        return str(cond.get("reason") or "JobFailed"), str(cond.get("message") or "the training Job failed")
    code, detail = exit_info
    # The trainer's report says it best; the termination message may be a log tail (keep its end).
    detail = reported.strip() or detail.strip()[-1500:]
    reason = {
        2: "InvalidConfig",
        3: "SuccessCriteriaNotMet",
        4: "DataRefused",
        5: "CheckpointRestoreFailed",
        6: "TrainingDiverged",
        7: "StoreRefused",
    }
    message = st.explain_exit_code(code) + (f": {detail[:1500]}" if detail else "")
    return reason.get(code, "TrainerFailed"), message


def _announce(
    body: Mapping[str, Any], old: Mapping[str, Any], patch: Mapping[str, Any], pods: list[dict[str, Any]]
) -> None:
    """Kubernetes events for what a user wants to hear about: phases, restarts, checkpoints."""
    ref = dict(body)
    if patch.get("phase") != old.get("phase"):
        kind = "Warning" if patch["phase"] == Phase.FAILED.value else "Normal"
        message = str(patch.get("message") or patch["phase"])
        _event(ref, kind, reason=str(patch["phase"]), message=message)
    if int(patch.get("restarts") or 0) > int(old.get("restarts") or 0):
        _event(ref, "Warning", reason="TrainerRestarted", message=_restart_message(pods))
    seen = {(p.get("uri"), p.get("problem")) for p in old.get("checkpointProblems") or []}
    for problem in patch.get("checkpointProblems") or []:
        if (problem.get("uri"), problem.get("problem")) not in seen:
            message = f"checkpoint {problem['uri']} not used ({problem['problem']}): {problem['reason']}"
            _event(ref, "Warning", reason="CheckpointRejected", message=message)
    new_ckpt, old_ckpt = patch.get("checkpoint") or {}, old.get("checkpoint") or {}
    if new_ckpt.get("verified") and (new_ckpt.get("step"), True) != (
        old_ckpt.get("step"),
        old_ckpt.get("verified"),
    ):
        message = f"step {new_ckpt.get('step')}: {new_ckpt.get('uri')}"
        _event(ref, "Normal", reason="CheckpointVerified", message=message)


def _restart_message(pods: list[dict[str, Any]]) -> str:
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    exit_info = _exit(failed[-1]) if failed else None
    code = exit_info[0] if exit_info else -1
    return (
        f"trainer pod ended ({st.explain_exit_code(code)}); "
        "the next pod resumes from the last verified checkpoint"
    )


def _changed(old: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    return any(old.get(k) != v and not (old.get(k) is None and v in ([], {})) for k, v in patch.items())


# ---------------------------------------------------------------------------------------------
# Metrics


def _record_metrics(body: Mapping[str, Any], patch: Mapping[str, Any]) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    metrics.set_job_phase(namespace, name, str(patch.get("phase")), PHASES)
    restarts = metrics.JOB_RESTARTS.labels(namespace, name)  # exists at 0 before the first restart
    old_restarts = int((body.get("status") or {}).get("restarts") or 0)
    if int(patch.get("restarts") or 0) > old_restarts:
        restarts.inc(int(patch["restarts"]) - old_restarts)
    progress = patch.get("progress") or {}
    if progress.get("step") and (namespace, name) not in _first_step_seen:
        _first_step_seen.add((namespace, name))
        created = datetime.fromisoformat(str(body["metadata"]["creationTimestamp"]).replace("Z", "+00:00"))
        metrics.TIME_TO_FIRST_STEP.labels(namespace, name).set((datetime.now(UTC) - created).total_seconds())
    checkpoint = patch.get("checkpoint") or {}
    if checkpoint.get("verified"):
        _checkpoint_seen(namespace, name, int(checkpoint.get("step") or 0))


_checkpoints_seen: dict[tuple[str, str], tuple[int, float]] = {}
_first_step_seen: set[tuple[str, str]] = set()


def _checkpoint_seen(namespace: str, name: str, step: int) -> None:
    key = (namespace, name)
    now = datetime.now(UTC).timestamp()
    if key not in _checkpoints_seen or _checkpoints_seen[key][0] != step:
        _checkpoints_seen[key] = (step, now)
    metrics.CHECKPOINT_STEP.labels(namespace, name).set(step)
    metrics.CHECKPOINT_AGE.labels(namespace, name).set(now - _checkpoints_seen[key][1])


def _update_fleet_gauge(items: list[dict[str, Any]]) -> None:
    counts: dict[tuple[str, str], int] = {}
    for item in items:
        phase = (item.get("status") or {}).get("phase") or Phase.PENDING.value
        key = (item["metadata"]["namespace"], phase)
        counts[key] = counts.get(key, 0) + 1
    metrics.JOBS.clear()
    for (namespace, phase), count in counts.items():
        metrics.JOBS.labels(namespace, phase).set(count)


# The liveness probe fails (HTTP 500 on /healthz) when no refresh pass has started with an answer
# from the API server (a long pass over many jobs is fine), or the watch has not delivered the
# operator's own heartbeat, for this long:
# a restarted operator gets fresh connections and watches.
STALE_AFTER_SECONDS = 300.0
HEARTBEAT = "finetune-operator-heartbeat"


def _beat() -> None:
    """Touch the heartbeat ConfigMap; `child_changed` sees the change come back through the watch.
    Without it an idle cluster's watch is silent whether it works or not."""
    namespace = _settings().heartbeat_namespace
    if not namespace:
        return
    try:
        _kube().apply(builders.heartbeat_config_map(namespace, HEARTBEAT, datetime.now(UTC)))
    except Exception:
        log.exception("heartbeat write to %s/%s failed", namespace, HEARTBEAT)


# The probes run on every replica (with /healthz); a replica that does not act reports None.
@kopf.on.probe(id="watchSilenceSeconds", registry=SERVING)
def watch_silence(**_: Any) -> float | None:
    if "started" not in _state or not _settings().heartbeat_namespace:
        return None
    seen = float(_state.get("heartbeat_seen", _state.get("started", time.monotonic())))
    silence = time.monotonic() - seen
    if silence > STALE_AFTER_SECONDS:
        raise kopf.PermanentError(
            f"the watch delivered no heartbeat for {silence:.0f}s: the operator's watch has gone silent"
        )
    return round(silence, 1)


@kopf.on.probe(id="refreshAgeSeconds", registry=SERVING)
def refresh_age(**_: Any) -> float | None:
    if "started" not in _state:
        return None
    age = time.monotonic() - float(_state.get("last_refresh", _state.get("started", time.monotonic())))
    if age > STALE_AFTER_SECONDS:
        raise kopf.PermanentError(f"no successful refresh for {age:.0f}s: the API server is unreachable")
    return round(age, 1)


@kopf.on.cleanup()
def stop_refresh(**_: Any) -> None:
    if "stop" in _state:
        _state["stop"].set()


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
def forget(type: str, meta: kopf.Meta, **_: Any) -> None:
    """Children go with their owner (ownerReferences); only the metrics need forgetting. An event
    handler, not on.delete, so FineTuneJobs carry no finalizer."""
    if type != "DELETED":
        return
    metrics.forget_job(str(meta["namespace"]), str(meta["name"]), PHASES)
    with _sync_locks_guard:
        _sync_locks.pop((str(meta["namespace"]), str(meta["name"])), None)
    _checkpoints_seen.pop((str(meta["namespace"]), str(meta["name"])), None)
    _first_step_seen.discard((str(meta["namespace"]), str(meta["name"])))
