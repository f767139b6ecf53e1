"""`python -m finetune_trainer` end to end on CPU with a tiny model: what a user would see."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.data.formats import DEFAULT_TEMPLATE
from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.testing.cli import base_config, run_trainer
from finetune_trainer.testing.tiny import CHATML_TEMPLATE, QUESTION, synthetic_dataset, write_jsonl

CANARY = "canary-secret-7f3a9c1e55"

TEXT_SUFFIXES = {".json", ".jsonl", ".prom", ".jinja", ".txt", ".md"}
SECRET_ENV = {"SUPABASE_SERVICE_ROLE_KEY": CANARY, "AWS_SECRET_ACCESS_KEY": CANARY + "-aws"}


def all_output_text(out: Path) -> str:
    return "\n".join(
        p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
    )


def test_full_fine_tune_beats_the_baseline_and_saves_the_artifact(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(synthetic_dataset(600, seed=0), tmp_path / "train.jsonl")
    config = base_config(
        tiny_model,
        data,
        tmp_path / "out",
        "full",
        goal={
            "metrics": ["eval_loss", "exact_match", "token_f1"],
            "successCriteria": [{"metric": "eval_loss", "maxRegression": 0.0}],
        },
        hyperparameters={"epochs": 2, "batchSize": 8, "learningRate": 3e-3, "loggingSteps": 10},
        validation={
            "maxNewTokens": 8,
            "maxGenerationSamples": 40,
            "prompts": [f"{QUESTION}\n\napple river stone"],
            "heldOutScenarios": [{"prompt": f"{QUESTION}\n\nisland lemon raven", "expect": "south"}],
        },
    )
    config["dataset"]["split"] = {"validation": 0.04, "test": 0.04, "seed": 1}
    config["method"]["allowSmallDataFullFineTune"] = True
    result = run_trainer(config, tmp_path, env=SECRET_ENV)
    assert result.code == ExitCode.SUCCEEDED, result.log[-3000:]

    report = result.report()
    assert report["phase"] == "Succeeded"
    assert report["final"]["exact_match"] > report["baseline"]["exact_match"] + 0.2
    assert report["final"]["eval_loss"] < report["baseline"]["eval_loss"]
    assert report["data"]["split"] == {"train": 552, "validation": 24, "test": 24}
    assert {c["name"] for c in report["predictions"]["checks"]} >= {"non_empty", "expected_answer"}

    final = result.out / "final"
    assert (final / "model.safetensors").is_file()
    assert (final / "prompt_template.jinja").read_text() == CHATML_TEMPLATE
    assert json.loads((final / "data_report.json").read_text())["examples"] == 600
    assert "torch" in json.loads((final / "environment.json").read_text())["versions"]
    assert json.loads((final / "training_config.json").read_text())["method"]["type"] == "full"
    assert_card_states_the_metrics(final)
    assert list((result.out / "prompts").glob("epoch-*.jsonl"))

    metrics = (result.out / "metrics.prom").read_text()
    assert (
        'finetune_eval_metric_value{job="tiny-job",metric="exact_match",namespace="ns",split="final"}'
        in metrics
    )
    assert "finetune_trainer_runtime_info{" in metrics and 'method="full"' in metrics
    assert 'finetune_predictions_check_passed{check="non_empty"' in metrics

    assert "SUPABASE_SERVICE_ROLE_KEY" in result.log  # named as present...
    assert CANARY not in result.log  # ...never its value
    assert CANARY not in all_output_text(result.out)


def test_lora_saves_an_adapter_with_the_training_template(
    tiny_model_no_template: Path, tmp_path: Path
) -> None:
    """LoRA on a random base checks mechanics; the unmet criterion makes the run exit 3."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(synthetic_dataset(120, seed=2, fmt="sharegpt"), tmp_path / "train.jsonl")
    config = base_config(
        tiny_model_no_template,
        data,
        tmp_path / "out",
        "lora",
        goal={
            "metrics": ["eval_loss", "exact_match"],
            "successCriteria": [{"metric": "exact_match", "atLeast": 0.9}],
        },
    )
    config["dataset"] |= {"format": "sharegpt", "chunking": {"maxTokens": 128, "packing": True}}
    config["output"] = {"mergeAdapter": True}
    result = run_trainer(config, tmp_path, env=SECRET_ENV)
    assert result.code == ExitCode.SUCCESS_CRITERIA_NOT_MET, result.log[-3000:]
    report = result.report()
    assert report["phase"] == "Failed"
    assert "success criteria not met: exact_match" in report["message"]
    assert "merged weights saved under final/merged/" in report["message"]
    assert report["final"]["eval_loss"] < report["baseline"]["eval_loss"]

    final = result.out / "final"
    assert (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    assert (final / "prompt_template.jinja").read_text() == DEFAULT_TEMPLATE
    assert AutoTokenizer.from_pretrained(final).chat_template == DEFAULT_TEMPLATE
    assert AutoTokenizer.from_pretrained(final / "merged").chat_template == DEFAULT_TEMPLATE
    assert AutoModelForCausalLM.from_pretrained(final / "merged").num_parameters() > 0  # no peft needed
    assert_card_states_the_metrics(final)
    assert "| exact_match | atLeast 0.9 | NOT met | fail |" in (final / "README.md").read_text()
    assert CANARY not in result.log + all_output_text(result.out)


def assert_card_states_the_metrics(final: Path) -> None:
    """The model card's table and metadata carry the numbers of the metrics sidecar."""
    from huggingface_hub import ModelCard

    metrics = json.loads((final / "metrics.json").read_text())
    text = (final / "README.md").read_text()
    for metric, baseline in metrics["baseline"].items():
        assert f"| {metric} | {baseline:.4g} | {metrics['final'][metric]:.4g} |" in text, metric
    data: Any = ModelCard(text).data
    index = {r.metric_name: r.metric_value for r in data.eval_results}
    assert index == {
        f"{m} ({stage})": v for stage in ("baseline", "final") for m, v in metrics[stage].items()
    }


def test_small_data_full_fine_tune_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(synthetic_dataset(200, seed=0), tmp_path / "train.jsonl")
    result = run_trainer(base_config(tiny_model, data, tmp_path / "out", "full"), tmp_path)
    assert result.code == ExitCode.DATA_REFUSED
    assert "allowSmallDataFullFineTune" in result.log
    assert result.report()["phase"] == "Failed"
    assert "200 examples" in result.report()["message"]


@pytest.mark.parametrize(
    ("case", "code", "expected"),
    [
        ("malformed_jsonl", ExitCode.DATA_REFUSED, "train.jsonl line 3: invalid JSON"),
        ("missing_field", ExitCode.DATA_REFUSED, "needs a non-empty string field 'output'"),
        ("empty", ExitCode.DATA_REFUSED, "holds no examples"),
        ("max_tokens_above_context", ExitCode.INVALID_CONFIG, "above the model's context of 256 tokens"),
        ("missing_job_id", ExitCode.INVALID_CONFIG, "env JOB_ID: not set"),
    ],
)
def test_bad_inputs_exit_with_a_clear_reason(
    tiny_model: Path, tmp_path: Path, case: str, code: ExitCode, expected: str
) -> None:
    records = synthetic_dataset(20, seed=0)
    data = tmp_path / "train.jsonl"
    write_jsonl(records, data)
    config = base_config(tiny_model, data, tmp_path / "out", "lora")
    env: dict[str, str] = {}
    if case == "malformed_jsonl":
        lines = data.read_text().splitlines()
        lines[2] = lines[2][:-5]
        data.write_text("\n".join(lines))
    elif case == "missing_field":
        write_jsonl([{"instruction": "x", "input": "y"}, *records], data)
    elif case == "empty":
        data.write_text("")
    elif case == "max_tokens_above_context":
        config["dataset"]["chunking"]["maxTokens"] = 4096
    else:
        env["JOB_ID"] = ""
    result = run_trainer(config, tmp_path, env=env)
    assert result.code == code, result.log[-2000:]
    assert expected in result.log
