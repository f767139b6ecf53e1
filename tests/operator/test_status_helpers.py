"""Status as users read it: conditions with observedGeneration, the phase from the Job, and the
trainer's report copied into status without breaking the schema."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest

from finetune_operator import api, status
from finetune_operator.api import Phase, ResolvedMethodType
from finetune_operator.policy import Finding, MethodDecision, Verdict
from finetune_trainer.report_model import (
    CheckpointInfo,
    CheckpointProblem,
    DataSummary,
    MethodInfo,
    Progress,
    Ranks,
    SplitSizes,
    TrainerReport,
)
from finetune_trainer.report_model import Phase as ReportPhase

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = datetime(2025, 1, 2, 4, 0, 0, tzinfo=UTC)


def test_condition_shape() -> None:
    cond = status.condition(
        "SecretsReady", False, "SecretMissing", "Secret s3 not found", generation=4, now=T0
    )
    assert cond == {
        "type": "SecretsReady",
        "status": "False",
        "reason": "SecretMissing",
        "message": "Secret s3 not found",
        "observedGeneration": 4,
        "lastTransitionTime": "2025-01-02T03:04:05Z",
    }


def test_transition_time_moves_only_when_status_changes() -> None:
    old = [
        status.condition("SpecValid", True, "Valid", "ok", generation=1, now=T0),
        status.condition("SecretsReady", False, "SecretMissing", "missing", generation=1, now=T0),
    ]
    same = status.set_condition(
        old, status.condition("SpecValid", True, "Valid", "still ok", generation=2, now=T1)
    )
    assert same[0]["lastTransitionTime"] == "2025-01-02T03:04:05Z"
    assert (same[0]["message"], same[0]["observedGeneration"]) == ("still ok", 2)
    assert same[1] == old[1]
    flipped = status.set_condition(
        old, status.condition("SecretsReady", True, "SecretsFound", "ok", generation=2, now=T1)
    )
    assert flipped[1]["lastTransitionTime"] == "2025-01-02T04:00:00Z"
    added = status.set_condition(
        old, status.condition("MemoryFits", True, "EstimateFits", "ok", generation=2, now=T1)
    )
    assert [c["type"] for c in added] == ["SpecValid", "SecretsReady", "MemoryFits"]


def test_findings_become_conditions_worst_first() -> None:
    findings = [
        Finding("GoalMeasurable", Verdict.WARN, "FewTestExamples", "about 20 test examples"),
        Finding("GoalMeasurable", Verdict.REFUSE, "NoTestExamples", "no test example"),
        Finding("MemoryFits", Verdict.WARN, "EstimateTight", "tight"),
    ]
    conditions = {c["type"]: c for c in status.merge_findings([], findings, generation=3, now=T0)}
    goal = conditions["GoalMeasurable"]
    assert (goal["status"], goal["reason"]) == ("False", "NoTestExamples")
    assert "about 20 test examples" in goal["message"] and "no test example" in goal["message"]
    assert (conditions["MemoryFits"]["status"], conditions["MemoryFits"]["reason"]) == (
        "True",
        "EstimateTight",
    )


def job_status(condition: str | None = None, active: int = 0) -> dict[str, Any]:
    conditions = [{"type": condition, "status": "True"}] if condition else []
    return {"active": active, "conditions": conditions}


@pytest.mark.parametrize(
    ("job", "reported", "previous", "phase"),
    [
        (None, None, None, Phase.PENDING),
        (job_status(), None, None, Phase.PENDING),
        (job_status(active=1), None, "Pending", Phase.PREPARING),
        (job_status(active=2), "Baseline", "Preparing", Phase.BASELINE),
        (job_status(active=1), "Training", "Baseline", Phase.TRAINING),
        (job_status(active=1), "Succeeded", "Evaluating", Phase.EVALUATING),
        # A failing attempt whose pod has not ended yet shows where it was, never "Evaluating".
        (job_status(active=1), "Failed", "Training", Phase.TRAINING),
        (job_status(active=1), "Failed", "Pending", Phase.PREPARING),
        (job_status("Suspended"), "Training", "Training", Phase.SUSPENDED),
        (job_status("Complete"), "Succeeded", "Evaluating", Phase.SUCCEEDED),
        (job_status("Failed"), "Training", "Training", Phase.FAILED),
        (job_status("FailureTarget", active=1), "Training", "Training", Phase.FAILED),
    ],
)
def test_phase_from_job(
    job: dict[str, Any] | None, reported: str | None, previous: str | None, phase: Phase
) -> None:
    assert status.phase_from_job(job, reported, previous) == phase


def test_phase_from_job_accepts_the_trainers_enum() -> None:
    assert status.phase_from_job(job_status(active=1), ReportPhase.TRAINING) == Phase.TRAINING


def full_report(**changes: Any) -> TrainerReport:
    fields: dict[str, Any] = {
        "phase": ReportPhase.TRAINING,
        "method": MethodInfo(type="qlora", reason="on-prem, 3,200 examples"),
        "ranks": Ranks(world_size=16, per_pod=8, pods=2),
        "data": DataSummary(
            raw=3500,
            duplicates_removed=300,
            examples=3200,
            tokens=1_200_000,
            chunks=1400,
            split=SplitSizes(train=1260, validation=70, test=70),
        ),
        "baseline": {"eval_loss": 2.91, "exact_match": 0.02},
        "progress": Progress(step=400, total_steps=900, epoch=1.3, loss=1.42, tokens_per_second=5300.0),
        "checkpoint": CheckpointInfo(
            uri="s3://ckpt/jobs/ns/bot/uid/checkpoints/step-400", step=400, verified=True
        ),
        "message": "training",
    }
    fields.update(changes)
    return TrainerReport(**fields)


def test_report_is_copied_into_status() -> None:
    patch = status.status_from_report(full_report())
    assert patch["phase"] == "Training"
    assert patch["method"] == {"type": "qlora", "reason": "on-prem, 3,200 examples"}
    assert patch["ranks"] == {"worldSize": 16, "perPod": 8, "pods": 2}
    assert patch["data"]["split"] == {"train": 1260, "validation": 70, "test": 70}
    assert patch["data"]["duplicatesRemoved"] == 300
    assert patch["baseline"] == {"eval_loss": 2.91, "exact_match": 0.02}
    assert patch["progress"]["summary"] == "44% (400/900)" and patch["progress"]["percent"] == 44
    assert patch["progress"]["tokensPerSecond"] == 5300.0
    assert patch["checkpoint"]["verified"] is True and patch["checkpoint"]["step"] == 400
    assert "conditions" not in patch and "observedGeneration" not in patch  # never reset operator fields
    api.FineTuneJobStatus.model_validate(patch)


def test_checkpoint_time_is_its_commit_time_never_the_previous_ones() -> None:
    uri = "s3://ckpt/jobs/ns/bot/uid/checkpoints/step-"
    committed = CheckpointInfo(uri=uri + "400", step=400, verified=True, time="2026-11-27T08:58:51Z")
    first = status.status_from_report(full_report(checkpoint=committed))
    assert first["checkpoint"]["time"] == "2026-11-27T08:58:51Z"

    # step 600 is handed to the uploader, not committed yet; the status is merge-patched
    handed_over = CheckpointInfo(uri=uri + "600", step=600)
    patch = status.status_from_report(
        full_report(checkpoint=handed_over), {"checkpoint": first["checkpoint"]}
    )
    assert patch["checkpoint"] == {"uri": uri + "600", "step": 600, "verified": False, "time": None}
    again = status.status_from_report(full_report(checkpoint=handed_over), {"checkpoint": {"step": 600}})
    assert "time" not in again["checkpoint"], "nothing to clear: no patch churn"


def test_checkpoints_not_used_are_listed_with_their_reason() -> None:
    problems = [
        CheckpointProblem(
            uri=f"s3://ckpt/jobs/ns/bot/uid/checkpoints/step-{n}", problem="skipped", reason="x" * 5000
        )
        for n in range(7)
    ]
    patch = status.status_from_report(full_report(checkpoint_problems=problems))
    listed = patch["checkpointProblems"]
    assert [p["uri"].rsplit("-", 1)[1] for p in listed] == ["2", "3", "4", "5", "6"], "the latest five"
    assert all(len(p["reason"]) <= status.MAX_REASON for p in listed)
    api.FineTuneJobStatus.model_validate(patch)


def test_report_end_phases_are_left_to_the_job() -> None:
    assert "phase" not in status.status_from_report(full_report(phase=ReportPhase.SUCCEEDED))
    assert "phase" not in status.status_from_report(full_report(phase=ReportPhase.FAILED))


def test_values_the_schema_cannot_hold_are_left_out() -> None:
    report = full_report(
        progress=Progress(step=10, total_steps=0, loss=math.nan),
        baseline={"eval_loss": math.inf, "bad metric name!": 1.0, "rougeL": 0.3},
        method=MethodInfo(type="dpo"),
    )
    patch = status.status_from_report(report)
    assert patch["progress"] == {"step": 10, "totalSteps": 0, "epoch": 0.0}
    assert patch["baseline"] == {"rougeL": 0.3}
    assert "method" not in patch


@pytest.mark.parametrize("text", [None, "", "   ", "{not json", '{"phase": "Dancing"}'])
def test_unreadable_report_is_ignored(text: str | None) -> None:
    assert status.parse_report(text) is None


def test_report_round_trip_through_the_config_map() -> None:
    parsed = status.parse_report(full_report().to_json())
    assert parsed is not None and parsed.progress is not None and parsed.progress.step == 400


def test_operator_status_patch() -> None:
    decision = MethodDecision(ResolvedMethodType.FULL, "cloud, 20,000 examples", 3)
    patch = status.status_patch(
        generation=7, phase=Phase.TRAINING, decision=decision, startTime=T0, restarts=1, secretsHash="abc"
    )
    assert patch == {
        "observedGeneration": 7,
        "phase": "Training",
        "method": {"type": "full", "reason": "cloud, 20,000 examples", "deepspeedStage": 3},
        "startTime": "2025-01-02T03:04:05Z",
        "restarts": 1,
        "secretsHash": "abc",
    }


def test_status_patch_refuses_what_the_crd_would_refuse() -> None:
    with pytest.raises(ValueError, match="restarts"):
        status.status_patch(generation=1, restarts=-1)


@pytest.mark.parametrize(
    ("code", "phrase"),
    [
        (3, "successCriteria"),
        (4, "data was refused"),
        (6, "diverged"),
        (75, "resumes"),
        (76, "outside training"),
        (42, "unexpected"),
    ],
)
def test_exit_codes_are_explained(code: int, phrase: str) -> None:
    text = status.explain_exit_code(code)
    assert text.startswith(f"exit code {code}: ") and phrase in text


def test_samples_reach_the_status_clipped() -> None:
    from finetune_trainer.report_model import Sample, TrainerReport

    report = TrainerReport(
        samples=[Sample(prompt="Unicode name of 'é'?", reference="x" * 600, baseline="It is é.")] * 10
    )
    samples = status.status_from_report(report)["samples"]
    assert len(samples) == status.MAX_SAMPLES
    assert samples[0]["prompt"] == "Unicode name of 'é'?" and samples[0]["baseline"] == "It is é."
    assert len(samples[0]["reference"]) == status.MAX_SAMPLE_TEXT and "final" not in samples[0]


@pytest.mark.parametrize(
    ("job", "phase", "nodes", "old", "restarts"),
    [
        ({}, Phase.PREPARING, 1, 0, 0),
        ({"failed": 1, "active": 1}, Phase.TRAINING, 1, 0, 1),
        # A failed pod not yet counted by the Job controller is a restart already.
        ({"failed": 1, "uncountedTerminatedPods": {"failed": ["u1"]}}, Phase.TRAINING, 1, 0, 2),
        # Old pods garbage-collected: the counter stays, and the status never goes down.
        ({"failed": 1}, Phase.TRAINING, 1, 3, 3),
        # The failure that ends the job is not a restart; for two pods, both go down together.
        ({"failed": 1}, Phase.FAILED, 1, 0, 0),
        ({"failed": 3}, Phase.FAILED, 1, 0, 2),
        ({"failed": 4}, Phase.FAILED, 2, 1, 2),
        ({"failed": 2}, Phase.SUCCEEDED, 1, 0, 2),
    ],
)
def test_restarts_from_the_jobs_counters(
    job: dict[str, Any], phase: Phase, nodes: int, old: int, restarts: int
) -> None:
    assert status.restarts_from_job(job, phase, nodes, old) == restarts


RUNNING = status.SecretFacts(
    names=["persistence", "s3-creds"],
    missing=[],
    current="h1",
    recorded="h1",
    restarting=False,
    job_suspended=False,
    job_active=True,
    user_suspended=False,
    secrets_ready_false=False,
)


def secret_case(**changes: Any) -> status.SecretFacts:
    return status.SecretFacts(**{**RUNNING.__dict__, **changes})


@pytest.mark.parametrize(
    ("facts", "conditions", "suspend", "phase", "hash_", "events"),
    [
        (RUNNING, [], None, None, "h1", ("", "")),
        # Deleted, not rotated: reported once, the Job keeps running and nothing is recorded.
        (
            secret_case(missing=["persistence"], current="h2"),
            [("SecretsReady", False, "SecretMissing")],
            None,
            None,
            None,
            ("", "persistence"),
        ),
        (
            secret_case(missing=["persistence"], current="h2", secrets_ready_false=True),
            [("SecretsReady", False, "SecretMissing")],
            None,
            None,
            None,
            ("", ""),
        ),
        # Back again with a new version: ready, and a rotation restarts the trainer.
        (
            secret_case(current="h3", secrets_ready_false=True),
            [("SecretsReady", True, "Found"), ("SecretsRotated", True, "Restarting")],
            True,
            Phase.TRAINING,
            "h3",
            ("changed", ""),
        ),
        (
            secret_case(current="h3"),
            [("SecretsRotated", True, "Restarting")],
            True,
            Phase.TRAINING,
            "h3",
            ("changed", ""),
        ),
        # Suspended for the rotation: resumed only once the old pods are gone.
        (secret_case(restarting=True, job_suspended=True), [], None, Phase.TRAINING, None, ("", "")),
        (
            secret_case(restarting=True, job_suspended=True, job_active=False),
            [("SecretsRotated", True, "Restarted")],
            False,
            Phase.TRAINING,
            None,
            ("", ""),
        ),
        # The user's own suspend: nothing runs that could use the old values.
        (secret_case(current="h3", user_suspended=True, job_suspended=True), [], None, None, "h3", ("", "")),
        (secret_case(recorded=None, current="h3"), [], None, None, "h3", ("", "")),
    ],
)
def test_secret_step(
    facts: status.SecretFacts,
    conditions: list[tuple[str, bool, str]],
    suspend: bool | None,
    phase: Phase | None,
    hash_: str | None,
    events: tuple[str, str],
) -> None:
    step = status.secret_step(facts)
    assert [c[:3] for c in step.conditions] == conditions
    assert (step.suspend_job, step.phase, step.secrets_hash) == (suspend, phase, hash_)
    normal, warning = events
    assert (normal in step.event, warning in step.warning) == (True, True)
    assert bool(step.event) == bool(normal) and bool(step.warning) == bool(warning)


NOW = datetime(2026, 12, 2, 8, 0, 30, tzinfo=UTC)


def batch_job(
    suspend: bool = False, start: str | None = "2026-12-02T08:00:00Z", **status_: Any
) -> dict[str, Any]:
    status_fields = {"startTime": start, **status_} if start else dict(status_)
    return {
        "metadata": {"creationTimestamp": "2026-12-02T08:00:00Z"},
        "spec": {"suspend": suspend},
        "status": status_fields,
    }


@pytest.mark.parametrize(
    ("job", "pods", "now", "missing"),
    [
        (batch_job(), [], NOW, True),
        (batch_job(), [], datetime(2026, 12, 2, 8, 0, 10, tzinfo=UTC), False),  # give it a moment
        (batch_job(), [{"metadata": {"name": "p"}}], NOW, False),
        (batch_job(active=1), [], NOW, False),
        (batch_job(suspend=True), [], NOW, False),
        (batch_job(conditions=[{"type": "Complete", "status": "True"}]), [], NOW, False),
        (batch_job(start=None), [], NOW, True),  # from the Job's creation
    ],
)
def test_pods_missing(job: dict[str, Any], pods: list[dict[str, Any]], now: datetime, missing: bool) -> None:
    assert status.pods_missing(job, pods, now) is missing


def test_pods_condition_quotes_the_job_controller() -> None:
    refused = status.pods_condition(
        ['pods "bot-x" is forbidden: exceeded quota: small'], generation=2, now=T0
    )
    assert (refused["status"], refused["reason"]) == ("False", "FailedCreate")
    assert refused["message"].endswith("exceeded quota: small")
    assert status.pods_condition([], generation=2, now=T0)["status"] == "True"
