"""Pure helpers that build FineTuneJob status: conditions, the method decision, the phase of the
Job, and the fields copied from the trainer's progress report.

Every helper returns camelCase dicts ready for a status merge patch, validated against the same
models the CRD is generated from, so the API server never rejects what is built here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from finetune_operator import api
from finetune_operator.api import ConditionStatus, Phase
from finetune_operator.policy import Finding, MethodDecision, Verdict
from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.report_model import TrainerReport

Patch = dict[str, Any]

MAX_MESSAGE = 4096
MAX_REASON = 1024
MAX_METRICS = 64
MAX_SAMPLES = 8
MAX_SAMPLE_TEXT = 512

# Phases the trainer reports while it runs; the end of the run is read from the Job instead.
RUNNING_PHASES = frozenset({Phase.PREPARING, Phase.BASELINE, Phase.TRAINING, Phase.EVALUATING})

EXIT_CODE_MEANINGS: dict[int, str] = {
    ExitCode.SUCCEEDED: "training finished and the success criteria were met",
    ExitCode.FAILED: "the trainer stopped on an unexpected error (see the pod log)",
    ExitCode.INVALID_CONFIG: "the trainer rejected its configuration",
    ExitCode.SUCCESS_CRITERIA_NOT_MET: "the fine-tuned model did not meet spec.goal.successCriteria",
    ExitCode.DATA_REFUSED: "the data was refused (too few examples for the method, or failed checks)",
    ExitCode.CHECKPOINT_RESTORE_FAILED: "a checkpoint could not be restored and verified",
    ExitCode.DIVERGED: "training diverged (a loss, gradient norm or weight was not finite, or the loss "
    "spiked); no checkpoint after it was kept",
    ExitCode.STORE_REFUSED: "the object store refused the job's credentials or access, or has no such "
    "bucket; not retried (the message names the store, the Secret and the fix)",
    ExitCode.PREEMPTED_CHECKPOINTED: "the pod was stopped after saving a checkpoint; training resumes",
    ExitCode.PREEMPTED_OUTSIDE_TRAINING: "the pod was stopped outside training (preparing, loading or "
    "evaluating); the next pod resumes from the last committed checkpoint",
}


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dump(model: BaseModel) -> Patch:
    # exclude_unset: a merge patch must not reset fields (conditions: []) it did not mean to touch.
    return model.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_unset=True)


def _finite(values: Mapping[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or infinity (a diverged loss): such values are left out."""
    return {k: v for k, v in values.items() if not (isinstance(v, float) and not math.isfinite(v))}


# ---------------------------------------------------------------------------------------------
# Conditions


def condition(
    type_: str,
    status: bool | ConditionStatus,
    reason: str,
    message: str,
    *,
    generation: int,
    now: datetime,
) -> Patch:
    """One condition in the standard shape, computed from metadata.generation `generation`."""
    if isinstance(status, bool):
        status = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    model = api.Condition(
        type=type_,
        status=status,
        reason=reason,
        message=_clip(message, MAX_MESSAGE),
        observed_generation=generation,
        last_transition_time=now,
    )
    return _dump(model)


def condition_from_finding(finding: Finding, *, generation: int, now: datetime) -> Patch:
    """A refused check is False; passed and warned checks are True (a warning still lets it run)."""
    return condition(
        finding.condition,
        finding.verdict != Verdict.REFUSE,
        finding.reason,
        finding.message,
        generation=generation,
        now=now,
    )


def set_condition(conditions: Sequence[Mapping[str, Any]], new: Mapping[str, Any]) -> list[Patch]:
    """Replace the condition of the same type. lastTransitionTime only moves when status changes."""
    out: list[Patch] = []
    replaced = False
    for old in conditions:
        if old.get("type") != new["type"]:
            out.append(dict(old))
            continue
        merged = dict(new)
        if old.get("status") == new["status"] and "lastTransitionTime" in old:
            merged["lastTransitionTime"] = old["lastTransitionTime"]
        out.append(merged)
        replaced = True
    if not replaced:
        out.append(dict(new))
    return out


def merge_findings(
    conditions: Sequence[Mapping[str, Any]],
    findings: Iterable[Finding],
    *,
    generation: int,
    now: datetime,
) -> list[Patch]:
    """Conditions after applying findings. Several findings for one condition: the worst wins and
    their messages are joined."""
    worst: dict[str, Finding] = {}
    messages: dict[str, list[str]] = {}
    rank = {Verdict.OK: 0, Verdict.WARN: 1, Verdict.REFUSE: 2}
    for finding in findings:
        messages.setdefault(finding.condition, []).append(finding.message)
        current = worst.get(finding.condition)
        if current is None or rank[finding.verdict] > rank[current.verdict]:
            worst[finding.condition] = finding
    result = [dict(c) for c in conditions]
    for type_, finding in worst.items():
        joined = Finding(type_, finding.verdict, finding.reason, "; ".join(messages[type_]))
        result = set_condition(result, condition_from_finding(joined, generation=generation, now=now))
    return result


# ---------------------------------------------------------------------------------------------
# Method and phase


def method_status(decision: MethodDecision) -> Patch:
    return _dump(
        api.MethodStatus(
            type=decision.type,
            reason=_clip(decision.reason, MAX_REASON),
            deepspeed_stage=3 if decision.deepspeed_stage == 3 else (2 if decision.deepspeed_stage else None),
        )
    )


def _job_condition(job_status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in job_status.get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond  # type: ignore[no-any-return]
    return None


def phase_from_job(
    job_status: Mapping[str, Any] | None, report_phase: str | None = None, previous: str | None = None
) -> Phase:
    """The job's phase from its batch/v1 Job status, refined by the phase the trainer reports
    (`TrainerReport.phase`) while it runs; `previous` is the phase in the status now. No Job yet:
    Pending."""
    if job_status is None:
        return Phase.PENDING
    if _job_condition(job_status, "Complete") or _job_condition(job_status, "SuccessCriteriaMet"):
        return Phase.SUCCEEDED
    if _job_condition(job_status, "Failed") or _job_condition(job_status, "FailureTarget"):
        return Phase.FAILED
    if _job_condition(job_status, "Suspended"):
        return Phase.SUSPENDED
    if int(job_status.get("active") or 0) > 0:
        if report_phase is None:
            return Phase.PREPARING
        return _active_phase(Phase(str(report_phase)), previous)
    return Phase.PENDING


def _active_phase(reported: Phase, previous: str | None) -> Phase:
    if reported in RUNNING_PHASES:
        return reported
    if reported == Phase.SUCCEEDED:
        return Phase.EVALUATING  # the trainer has finished; its pod still saves the final artifact
    # A failing attempt: the Job decides whether it is retried; until then nothing new happens.
    return Phase(previous) if previous in RUNNING_PHASES else Phase.PREPARING


def finished_run(status: Mapping[str, Any]) -> bool:
    """A run that launched and ended (a spec refused before launch has no completionTime)."""
    return status.get("phase") in (Phase.SUCCEEDED.value, Phase.FAILED.value) and bool(
        status.get("completionTime")
    )


def restarts_from_job(job_status: Mapping[str, Any], phase: Phase, nodes: int, old: int) -> int:
    """Pods that failed and were replaced, from the Job's own counters (pods are garbage-collected,
    counters are not). Preemptions and suspensions are not failures there (the pod failure policy
    ignores them); the failure that ends a Failed job is not a restart. Never goes down."""
    uncounted = (job_status.get("uncountedTerminatedPods") or {}).get("failed") or []
    failed = int(job_status.get("failed") or 0) + len(uncounted)
    if phase == Phase.FAILED:
        failed -= nodes
    return max(old, failed, 0)


@dataclass(frozen=True)
class SecretFacts:
    """What the status sync knows about the Secrets of a running job."""

    names: list[str]
    missing: list[str]
    current: str  # hash of the Secrets' resourceVersions now
    recorded: str | None  # the hash the running pods started with
    restarting: bool  # a rotation has suspended the Job and waits to resume it
    job_suspended: bool
    job_active: bool
    user_suspended: bool
    secrets_ready_false: bool


@dataclass(frozen=True)
class SecretStep:
    """What to change: conditions (type, status, reason, message), status fields, the Job's suspend,
    and events to post once the status is written."""

    conditions: list[tuple[str, bool, str, str]] = field(default_factory=list)
    secrets_hash: str | None = None
    phase: Phase | None = None
    suspend_job: bool | None = None
    event: str = ""
    warning: str = ""


def secret_step(facts: SecretFacts) -> SecretStep:
    """A deleted Secret is reported, not taken for a rotation; a rotated one restarts the trainer
    through a checkpoint (suspend, then resume once the old pods are gone)."""
    if facts.missing:
        message = (
            f"Secret(s) {', '.join(facts.missing)} deleted after the job launched: its running pods keep "
            "their values, but a new pod cannot start without them (fix: create them again)"
        )
        warning = "" if facts.secrets_ready_false else message
        return SecretStep([("SecretsReady", False, "SecretMissing", message)], warning=warning)
    back = ("SecretsReady", True, "Found", "every referenced Secret exists")
    ready = [back] if facts.secrets_ready_false else []
    if facts.restarting and facts.job_suspended and not facts.user_suspended:
        if facts.job_active:
            return SecretStep(ready, phase=Phase.TRAINING)  # the old pods are still checkpointing
        message = "new pods resume from the last checkpoint with the rotated Secrets"
        return SecretStep(
            [*ready, ("SecretsRotated", True, "Restarted", message)], phase=Phase.TRAINING, suspend_job=False
        )
    if facts.recorded is None or facts.current == facts.recorded or facts.user_suspended:
        return SecretStep(ready, secrets_hash=facts.current)  # a suspended job has nothing to restart
    message = f"Secret(s) {', '.join(facts.names)} changed: checkpointing, then restarting the trainer"
    return SecretStep(
        [*ready, ("SecretsRotated", True, "Restarting", message)],
        secrets_hash=facts.current,
        phase=Phase.TRAINING,
        suspend_job=True,
        event=message,
    )


POD_CREATION_GRACE_S = 20.0  # the Job controller creates pods within seconds when it can


def pods_missing(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], now: datetime) -> bool:
    """A running Job that has had time to create its pods but has none: the Job controller was
    refused (a missing ServiceAccount, a quota, an admission policy) and says why in its events."""
    spec, status = job.get("spec") or {}, job.get("status") or {}
    if spec.get("suspend") or pods or int(status.get("active") or 0) > 0:
        return False
    if _job_condition(status, "Complete") or _job_condition(status, "Failed"):
        return False
    since = status.get("startTime") or (job.get("metadata") or {}).get("creationTimestamp")
    if not since:
        return False
    started = datetime.fromisoformat(str(since).replace("Z", "+00:00"))
    return (now - started).total_seconds() > POD_CREATION_GRACE_S


def pods_condition(refusals: Sequence[str], *, generation: int, now: datetime) -> Patch:
    """PodsCreated: False with the Job controller's own words while it cannot create pods."""
    if not refusals:
        return condition(
            "PodsCreated", True, "Created", "the Job's pods were created", generation=generation, now=now
        )
    message = f"the Job controller cannot create the trainer pod: {refusals[-1]}"
    return condition("PodsCreated", False, "FailedCreate", message, generation=generation, now=now)


def explain_exit_code(code: int) -> str:
    meaning = EXIT_CODE_MEANINGS.get(code, "the trainer exited with an unexpected code")
    return f"exit code {code}: {meaning}"


# ---------------------------------------------------------------------------------------------
# The trainer's report


def parse_report(text: str | None) -> TrainerReport | None:
    """The report in the progress ConfigMap; None while it is empty or not valid JSON yet."""
    if not text or not text.strip():
        return None
    try:
        return TrainerReport.from_json(text)
    except ValidationError:
        return None


def progress_summary(step: int, total_steps: int) -> str | None:
    if total_steps <= 0:
        return None
    percent = min(100, step * 100 // total_steps)
    return f"{percent}% ({step}/{total_steps})"


_METRIC_NAME = re.compile(api.METRIC_NAME_PATTERN)


def _metric_values(values: Mapping[str, float]) -> dict[str, float]:
    """Metrics whose names fit the schema, at most MAX_METRICS; anything else is left out rather
    than failing the whole status update."""
    out: dict[str, float] = {}
    for name, value in sorted(_finite(values).items()):
        if len(out) < MAX_METRICS and len(name) <= 63 and _METRIC_NAME.match(name):
            out[name] = value
    return out


def status_from_report(report: TrainerReport, old: Mapping[str, Any] | None = None) -> Patch:
    """The status fields the trainer owns, copied from its report. The phase is included only while
    the trainer runs: success and failure are read from the Job. `old` is the current status."""
    fields: dict[str, Any] = {}
    if Phase(report.phase.value) in RUNNING_PHASES:
        fields["phase"] = report.phase.value
    if report.message:
        fields["message"] = _clip(report.message, MAX_MESSAGE)
    if report.method is not None and report.method.type in {m.value for m in api.ResolvedMethodType}:
        fields["method"] = {"type": report.method.type, "reason": _clip(report.method.reason, MAX_REASON)}
    if report.ranks is not None:
        fields["ranks"] = report.ranks.model_dump(by_alias=True)
    if report.data is not None:
        fields["data"] = report.data.model_dump(by_alias=True)
    if report.baseline:
        fields["baseline"] = _metric_values(report.baseline)
    if report.final:
        fields["final"] = _metric_values(report.final)
    if report.progress is not None:
        progress = _finite(report.progress.model_dump(by_alias=True, exclude_none=True))
        summary = progress_summary(report.progress.step, report.progress.total_steps)
        if summary is not None:
            progress["summary"] = summary
            progress["percent"] = min(100, report.progress.step * 100 // report.progress.total_steps)
        fields["progress"] = progress
    if report.checkpoint is not None:
        fields["checkpoint"] = report.checkpoint.model_dump(by_alias=True)
    if report.checkpoint_problems:
        fields["checkpointProblems"] = [
            {"uri": p.uri, "problem": p.problem[:32], "reason": _clip(p.reason, MAX_REASON)}
            for p in report.checkpoint_problems[-5:]
        ]
    if report.predictions is not None:
        fields["predictions"] = report.predictions.model_dump(by_alias=True)
    if report.samples:
        fields["samples"] = [
            _clipped_sample(s.model_dump(exclude_none=True)) for s in report.samples[:MAX_SAMPLES]
        ]
    return _forget_stale_commit_time(_dump(api.FineTuneJobStatus.model_validate(fields)), old or {})


def _clipped_sample(sample: Mapping[str, str]) -> dict[str, str]:
    return {key: _clip(value, MAX_SAMPLE_TEXT) for key, value in sample.items()}


def _forget_stale_commit_time(patch: Patch, old: Mapping[str, Any]) -> Patch:
    """A merge patch keeps what it does not name: a checkpoint not committed yet must not show the
    commit time of the one before it, so null removes that time."""
    checkpoint = patch.get("checkpoint")
    if checkpoint is not None and "time" not in checkpoint and (old.get("checkpoint") or {}).get("time"):
        checkpoint["time"] = None
    return patch


def status_patch(
    *,
    generation: int,
    phase: Phase | None = None,
    conditions: Sequence[Mapping[str, Any]] | None = None,
    decision: MethodDecision | None = None,
    message: str | None = None,
    **extra: Any,
) -> Patch:
    """A status merge patch from the operator's own fields; `extra` takes further camelCase fields
    (startTime, completionTime, restarts, secretsHash). Validated against the status model."""
    fields: dict[str, Any] = {"observedGeneration": generation, **extra}
    if phase is not None:
        fields["phase"] = phase.value
    if conditions is not None:
        fields["conditions"] = list(conditions)
    if decision is not None:
        fields["method"] = method_status(decision)
    if message is not None:
        fields["message"] = _clip(message, MAX_MESSAGE)
    for key in ("launchTime", "startTime", "completionTime"):
        if isinstance(fields.get(key), datetime):
            fields[key] = _timestamp(fields[key])
    return _dump(api.FineTuneJobStatus.model_validate(fields))
