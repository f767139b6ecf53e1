"""`TrainerReport`: the progress document the trainer writes and the operator reads.

Stored as camelCase JSON under key `progress.json` of the job's progress ConfigMap
(or in `report.file`). Importable without torch. Readers ignore unknown fields so
either side can add fields without breaking the other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

PROGRESS_KEY = "progress.json"


class _Doc(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


class Phase(StrEnum):
    PREPARING = "Preparing"
    BASELINE = "Baseline"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class MethodInfo(_Doc):
    type: str
    reason: str = ""


class Ranks(_Doc):
    """The processes that train: one per GPU in each pod."""

    world_size: int = 1
    per_pod: int = 1
    pods: int = 1


class SplitSizes(_Doc):
    train: int = 0
    validation: int = 0
    test: int = 0


class DataSummary(_Doc):
    raw: int = 0
    duplicates_removed: int = 0
    near_duplicates_removed: int = 0
    boilerplate_lines_removed: int = 0
    examples: int = 0
    tokens: int = 0
    chunks: int = 0
    truncated: int = 0
    bad_examples_dropped: int = Field(default=0, description="examples that cannot be trained on, left out")
    bad_example_reasons: dict[str, int] = Field(
        default_factory=dict, description="reason -> examples dropped"
    )
    split: SplitSizes = Field(default_factory=SplitSizes)


class Progress(_Doc):
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None


class CheckpointInfo(_Doc):
    uri: str
    step: int
    verified: bool = False
    time: str | None = Field(default=None, description="when its manifest was committed (UTC); None before")


class CheckResult(_Doc):
    name: str
    passed: bool


class Predictions(_Doc):
    passed: int = 0
    failed: int = 0
    checks: list[CheckResult] = Field(default_factory=list)


class Sample(_Doc):
    """A held-out test example with the base model's and the tuned model's answers."""

    prompt: str
    reference: str
    baseline: str | None = None
    final: str | None = None


class CheckpointProblem(_Doc):
    """A checkpoint that was not used: skipped as corrupt, failed verification, or not stored."""

    uri: str
    problem: str  # skipped, invalid, upload_failed
    reason: str


MAX_CHECKPOINT_PROBLEMS = 5


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TrainerReport(_Doc):
    phase: Phase = Phase.PREPARING
    method: MethodInfo | None = None
    ranks: Ranks | None = None
    data: DataSummary | None = None
    baseline: dict[str, float] = Field(default_factory=dict)
    progress: Progress | None = None
    checkpoint: CheckpointInfo | None = None
    checkpoint_problems: list[CheckpointProblem] = Field(default_factory=list)  # the latest few
    final: dict[str, float] = Field(default_factory=dict)
    predictions: Predictions | None = None
    samples: list[Sample] = Field(default_factory=list)
    message: str = ""
    updated_at: str = Field(default_factory=_now)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)

    @classmethod
    def from_json(cls, text: str) -> TrainerReport:
        return cls.model_validate_json(text)
