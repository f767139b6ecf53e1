"""The config contract: validation messages, camelCase round trip, no torch at import."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_trainer.config import ConfigError, TrainerConfig, load_config, parse_config

MINIMAL = {
    "job": {"namespace": "ns", "name": "job"},
    "model": {"source": "/models/tiny"},
    "dataset": {"source": "/data/train.jsonl"},
    "method": {"type": "lora"},
}


def test_minimal_config_gets_documented_defaults() -> None:
    config = parse_config(MINIMAL)
    assert config.dataset.chunking.max_tokens == 1024
    assert config.dataset.preprocessing.dedupe == "exact+near"
    assert config.metrics_port == 9400
    assert config.method.deepspeed.enabled is False


def test_round_trip_through_camel_case_json() -> None:
    config = parse_config(
        {
            **MINIMAL,
            "method": {"type": "full", "allowSmallDataFullFineTune": True, "deepspeed": {"enabled": True}},
        }
    )
    rendered = json.loads(config.to_json())
    assert rendered["method"]["allowSmallDataFullFineTune"] is True
    assert rendered["dataset"]["chunking"]["maxTokens"] == 1024
    assert TrainerConfig.model_validate(rendered) == config


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"dataset": {"source": "x", "chunking": {"maxTokens": 4}}}, "dataset.chunking.maxTokens: got 4"),
        ({"dataset": {"source": "x", "formatt": "alpaca"}}, 'dataset.formatt: got "alpaca"'),
        ({"method": {"type": "magic"}}, 'method.type: got "magic"'),
        ({"dataset": {"source": "x", "split": {"validation": 0.5, "test": 0.45}}}, "dataset.split: got"),
        ({"goal": {"successCriteria": [{"metric": "eval_loss"}]}}, "set exactly one of maxRegression"),
        (
            {"method": {"type": "full", "deepspeed": {"stage": 2, "offload": "optimizer+params"}}},
            "needs stage 3",
        ),
        (
            {"method": {"type": "full"}, "output": {"mergeAdapter": True}},
            "output.mergeAdapter: true with method.type full",
        ),
        ({"output": {"maxShardSize": "2 gigs"}}, 'output.maxShardSize: got "2 gigs"'),
    ],
)
def test_each_bad_field_is_named_with_value_and_fix(patch: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, **patch})
    assert any(expected in message for message in err.value.messages), err.value.messages
    assert all("fix" in m or "set " in m or "keep" in m for m in err.value.messages)


def test_one_message_per_bad_field() -> None:
    bad = {**MINIMAL, "metricsPort": -1, "hyperparameters": {"batchSize": 0}}
    with pytest.raises(ConfigError) as err:
        parse_config(bad)
    assert len(err.value.messages) == 2
    assert err.value.messages[0].startswith("hyperparameters.batchSize: got 0")


def test_load_config_reports_invalid_json_with_position(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"job": ')
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        load_config(path)


def test_contract_modules_import_without_torch() -> None:
    code = (
        "import sys; import finetune_trainer.config, finetune_trainer.report_model, "
        "finetune_trainer.exitcodes; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_invalid_config_exits_2_quickly_with_field_messages(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**MINIMAL, "dataset": {"source": "x", "format": "csvish"}}))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "--config", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert 'dataset.format: got "csvish"' in proc.stderr
    assert "use one of the allowed values" in proc.stderr
    assert time.monotonic() - start < 10  # no heavy imports before validation
