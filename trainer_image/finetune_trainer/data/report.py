"""The data report: what preparation did, written as data_report.json and sent to the job status."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from finetune_trainer.report_model import DataSummary

HISTOGRAM_EDGES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class AudioReport(BaseModel):
    """What the audio checks found (`dataset.format: audio`)."""

    model_config = ConfigDict(
        alias_generator=to_camel, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    sample_rate: int = Field(description="the model's rate; clips at other rates are resampled to it")
    window_seconds: float = Field(description="longer clips are left out")
    clips: int = 0
    seconds: float = 0.0
    resampled: int = 0
    left_out: dict[str, int] = Field(default_factory=dict, description="reason -> clips left out")


class DataReport(DataSummary):
    length_histogram: dict[str, int] = Field(default_factory=dict, description="tokens per example")
    template: str = Field(default="", description="'tokenizer' or 'default'")
    fingerprint: str = ""
    warnings: list[str] = Field(default_factory=list)
    audio: AudioReport | None = None

    def summary(self) -> DataSummary:
        return DataSummary.model_validate(self.model_dump(include=set(DataSummary.model_fields)))


def length_histogram(lengths: list[int]) -> dict[str, int]:
    """Counts per bucket, labelled by upper bound ("<=32", ..., ">4096")."""
    buckets = {f"<={edge}": 0 for edge in HISTOGRAM_EDGES}
    buckets[f">{HISTOGRAM_EDGES[-1]}"] = 0
    for length in lengths:
        label = next((f"<={e}" for e in HISTOGRAM_EDGES if length <= e), f">{HISTOGRAM_EDGES[-1]}")
        buckets[label] += 1
    return {label: count for label, count in buckets.items() if count}
