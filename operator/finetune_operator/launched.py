"""What may change once a job has launched (only `spec.suspend`), and how its missing children
are restored as they were launched.

A running trainer read its config when it started, and a Job's pod template cannot change, so any
other edit could only apply to some pods of a run (the retries, the next resume) and not to others.
The operator therefore records, on the Job it creates, a short hash of each spec field
(`fingerprints`), and after launch compares the live spec with them (`changed_fields`): a change is
reported, never applied. To run with a new spec, delete the job and create it again (with
`spec.resumeFrom` set to its last checkpoint, `status.checkpoint.uri`, to continue from it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from finetune_operator.api import ResolvedMethodType
from finetune_operator.builders import CONFIG_HASH_ANNOTATION, CONFIG_KEY, Manifest, short_hash
from finetune_operator.policy import MethodDecision

SPEC_ANNOTATION = "finetune.dev/spec-fingerprints"
MUTABLE = frozenset({"suspend"})
_DEPTH = 2  # spec.hyperparameters.learningRate: deep enough to name the field, small enough to store


def _leaves(value: Any, path: str, depth: int) -> dict[str, Any]:
    if depth == 0 or not isinstance(value, Mapping) or not value:
        return {path: value}
    out: dict[str, Any] = {}
    for key in sorted(value):
        out.update(_leaves(value[key], f"{path}.{key}", depth - 1))
    return out


def fingerprints(spec: Mapping[str, Any], *, mutable: bool = False) -> dict[str, str]:
    """A hash of each field of the spec (two levels deep), `suspend` left out unless `mutable`."""
    fields: dict[str, Any] = {}
    for key in sorted(set(spec) - (set() if mutable else MUTABLE)):
        fields.update(_leaves(spec[key], f"spec.{key}", _DEPTH - 1))
    return {path: short_hash(json.dumps(value, sort_keys=True)) for path, value in fields.items()}


def changed_fields(recorded: Mapping[str, str], spec: Mapping[str, Any]) -> list[str]:
    """The spec fields whose value differs from the one launched (added, removed or changed)."""
    now = fingerprints(spec)
    return sorted(path for path in set(recorded) | set(now) if recorded.get(path) != now.get(path))


def recorded(job: Mapping[str, Any]) -> dict[str, str] | None:
    """The fingerprints on a Job; None for a Job made before they were recorded."""
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    text = annotations.get(SPEC_ANNOTATION)
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else None


def annotation(spec: Mapping[str, Any]) -> dict[str, str]:
    return {SPEC_ANNOTATION: json.dumps(fingerprints(spec), sort_keys=True, separators=(",", ":"))}


FIX = (
    "only spec.suspend may change once launched; fix: undo the change, or delete the job and "
    "create it again with spec.resumeFrom: <status.checkpoint.uri> to continue from its last checkpoint"
)


def _shown(fields: list[str]) -> str:
    return ", ".join(fields[:8]) + (f" and {len(fields) - 8} more" if len(fields) > 8 else "")


def change_message(fields: list[str]) -> str:
    kept = "the running job keeps the spec it started with"
    return f"{_shown(fields)} changed after the job launched; {kept} ({FIX})"


def edit_refusal(old: Mapping[str, Any] | None, spec: Mapping[str, Any]) -> str | None:
    """Why an update of a FineTuneJob is refused at admission: it launched (status.launchTime) and
    a field other than spec.suspend changed. None when the update may go ahead."""
    if not old or not (old.get("status") or {}).get("launchTime"):
        return None  # not launched yet (or refused before launch): the change is what fixes it
    changed = changed_fields(fingerprints(old.get("spec") or {}), spec)
    if not changed:
        return None
    return f"{_shown(changed)} cannot change: the job launched with the spec it has ({FIX})"


# ---------------------------------------------------------------------------------------------
# Children of a launched job that went missing


def decision_from_status(status: Mapping[str, Any]) -> MethodDecision | None:
    """The method decided at launch, as recorded in status.method; None if none was recorded."""
    method = status.get("method") or {}
    try:
        kind = ResolvedMethodType(str(method.get("type")))
    except ValueError:
        return None
    stage = method.get("deepspeedStage")
    return MethodDecision(kind, str(method.get("reason") or ""), int(stage) if stage else None)


def launched_in_cloud(job: Mapping[str, Any]) -> bool:
    """IS_CLOUD as the Job's pods got it."""
    containers = ((job.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []
    env = {e.get("name"): e.get("value") for c in containers for e in c.get("env") or []}
    return env.get("IS_CLOUD") == "true"


def restorable(children: list[Manifest], job: Mapping[str, Any]) -> tuple[list[Manifest], str]:
    """The children to re-create if missing (all but the Job), and why the trainer config is not
    among them when it would differ from the one the Job's pods read (a changed operator setting)."""
    template = ((job.get("spec") or {}).get("template") or {}).get("metadata") or {}
    launched_hash = (template.get("annotations") or {}).get(CONFIG_HASH_ANNOTATION)
    out, problem = [], ""
    for child in children:
        if child["kind"] == "Job":
            continue
        config = (child.get("data") or {}).get(CONFIG_KEY) if child["kind"] == "ConfigMap" else None
        if config is not None and short_hash(config, 16) != launched_hash:
            problem = (
                f"ConfigMap {child['metadata']['name']} cannot be re-created as the Job's pods read "
                "it (the operator's settings changed since launch); new pods cannot start (fix: "
                "delete the job and create it again)"
            )
            continue
        out.append(child)
    return out, problem
