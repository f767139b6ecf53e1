"""The events a user reads in `kubectl describe ftj`: one per real change, none repeated."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from finetune_operator import handlers


class RecordingKube:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def event(self, body: Any, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))


@pytest.fixture
def kube(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingKube]:
    recording = RecordingKube()
    monkeypatch.setitem(handlers._state, "kube", recording)
    monkeypatch.setattr(handlers, "_events_posted", {})
    yield recording


BODY = {"metadata": {"namespace": "ns", "name": "bot", "uid": "u1"}}
CORRUPT = {
    "uri": "s3://ckpt/jobs/ns/bot/u1/checkpoints/step-40",
    "problem": "skipped",
    "reason": "model.safetensors: sha256 differs from the manifest",
}


def test_a_rejected_checkpoint_is_announced_once_naming_it(
    kube: RecordingKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handlers, "EVENT_REPEAT_S", 0.0)  # hours later: the status alone tells
    training = {"phase": "Training", "restarts": 0}
    handlers._announce(BODY, training, {**training, "checkpointProblems": [CORRUPT]}, [])
    assert kube.events == [
        (
            "Warning",
            "CheckpointRejected",
            f"checkpoint {CORRUPT['uri']} not used (skipped): {CORRUPT['reason']}",
        )
    ]
    later = {**training, "checkpointProblems": [CORRUPT]}
    handlers._announce(BODY, later, {**later, "progress": {"step": 50}}, [])
    assert len(kube.events) == 1, "the same problem in the next status is not news"


def test_a_phase_change_handled_twice_is_posted_once(kube: RecordingKube) -> None:
    """A sync retried after a conflict, or two passes that both saw the old phase."""
    for _ in range(2):
        handlers._announce(BODY, {"phase": "Pending"}, {"phase": "Preparing"}, [])
    assert [e[1] for e in kube.events] == ["Preparing"]
    handlers._announce({"metadata": {**BODY["metadata"], "uid": "u2"}}, {}, {"phase": "Preparing"}, [])
    assert [e[1] for e in kube.events] == ["Preparing", "Preparing"], "another job's event is its own"
