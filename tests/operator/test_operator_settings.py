"""Operator settings come from FINETUNE_OPERATOR_* environment variables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from finetune_operator.api import Environment
from finetune_operator.settings import OperatorSettings


def test_defaults_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "FINETUNE_OPERATOR_ENVIRONMENT",
        "FINETUNE_OPERATOR_GPU_MEMORY_GIB",
        "FINETUNE_OPERATOR_NAMESPACES",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = OperatorSettings()
    assert settings.environment == Environment.AUTO
    assert settings.namespaces == ()
    assert settings.trainer_metrics_port == 9400


def test_values_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_OPERATOR_ENVIRONMENT", "onprem")
    monkeypatch.setenv("FINETUNE_OPERATOR_GPU_MEMORY_GIB", "80")
    monkeypatch.setenv("FINETUNE_OPERATOR_NAMESPACES", "team-a, team-b,,")
    monkeypatch.setenv("FINETUNE_OPERATOR_TRAINER_IMAGE", "registry.local/trainer:dev")
    settings = OperatorSettings()
    assert settings.environment == Environment.ONPREM
    assert settings.gpu_memory_gib == 80
    assert settings.namespaces == ("team-a", "team-b")
    assert settings.trainer_image == "registry.local/trainer:dev"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FINETUNE_OPERATOR_ENVIRONMENT", "moon"),
        ("FINETUNE_OPERATOR_GPU_MEMORY_GIB", "-1"),
        ("FINETUNE_OPERATOR_TRAINER_RUN_AS_USER", "0"),
        ("FINETUNE_OPERATOR_DEFAULT_MODEL_PARAMETERS", "big"),
        ("FINETUNE_OPERATOR_TRAINER_SCRAPE_INTERVAL", "fast"),
        ("FINETUNE_OPERATOR_TRAINER_SCRAPE_INTERVAL", "10m"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("FINETUNE_OPERATOR_").lower()):
        OperatorSettings()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("15s", 15), ("2s", 2), ("1m30s", 90), ("500ms", 0.5), ("0s", 0), ("20", 20)],
)
def test_the_scrape_interval_reads_like_the_chart_s_podmonitor_interval(
    monkeypatch: pytest.MonkeyPatch, value: str, seconds: float
) -> None:
    monkeypatch.setenv("FINETUNE_OPERATOR_TRAINER_SCRAPE_INTERVAL", value)
    assert OperatorSettings().trainer_scrape_interval == pytest.approx(seconds)
