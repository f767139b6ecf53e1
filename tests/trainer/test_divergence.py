"""A run whose loss, gradient norm or weights stop being finite ends with exit 6, names the step and
the value in its status, and keeps no checkpoint from that step on."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

from finetune_trainer.callbacks import ProgressCallback, RunState, first_non_finite, non_finite_weight
from finetune_trainer.config import TrainerConfig
from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.reporting import ProgressReporter, TrainerMetrics
from finetune_trainer.testing.cli import Result, base_config, trainer_env
from finetune_trainer.testing.tiny import synthetic_dataset, write_jsonl

EVERY = 4  # checkpoints.everySteps and hyperparameters.loggingSteps
FAULT_STEP = 8  # a checkpoint and logging step: the save there must not happen

# `python -m finetune_trainer` with a fault injected into the Trainer at one step.
FAULTY_TRAINER = """
import sys

from finetune_trainer import __main__ as cli
from finetune_trainer.testing.faults import inject

inject(sys.argv[1], int(sys.argv[2]))
sys.exit(cli.main(sys.argv[3:]))
"""


def run_with_fault(tiny_model: Path, tmp_path: Path, kind: str) -> Result:
    data = write_jsonl(synthetic_dataset(200, seed=0), tmp_path / "train.jsonl")
    config = base_config(
        tiny_model,
        data,
        tmp_path / "out",
        "lora",
        hyperparameters={"maxSteps": 12, "batchSize": 4, "learningRate": 1e-3, "loggingSteps": EVERY},
        checkpoints={"everySteps": EVERY, "keep": 10},
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "faulty.py").write_text(FAULTY_TRAINER)
    command = [sys.executable, str(tmp_path / "faulty.py"), kind, str(FAULT_STEP)]
    proc = subprocess.run(
        [*command, "--config", str(tmp_path / "config.json")],
        capture_output=True,
        text=True,
        env=trainer_env(),
        timeout=300,
    )
    return Result(proc.returncode, proc.stdout + proc.stderr, tmp_path / "out")


def assert_only_finite_checkpoints_before_the_fault(result: Result) -> None:
    folders = sorted((result.out / "checkpoints").glob("checkpoint-*"))
    assert [f.name for f in folders] == [f"checkpoint-{EVERY}"], result.log[-3000:]
    for folder in folders:
        for file in folder.glob("*.safetensors"):
            for name, tensor in load_file(file).items():
                assert tensor.float().isfinite().all(), f"{folder.name}/{file.name}: {name} is not finite"
    assert not (result.out / "final").exists(), "a diverged run saves no final artifact"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (
            "loss",
            f"training diverged at step {FAULT_STEP}: loss nan (fix: lower hyperparameters.learningRate",
        ),
        ("weight", f"training diverged at step {FAULT_STEP}: weight base_model."),
    ],
)
def test_a_diverged_run_fails_for_good_and_keeps_no_non_finite_checkpoint(
    tiny_model: Path, tmp_path: Path, kind: str, expected: str
) -> None:
    result = run_with_fault(tiny_model, tmp_path, kind)
    assert result.code == ExitCode.DIVERGED, result.log[-3000:]
    report = result.report()
    assert report["phase"] == "Failed"
    assert report["message"].startswith(expected), report["message"]
    assert "nan" in report["message"] and "hyperparameters.learningRate from 0.001" in report["message"]
    assert_only_finite_checkpoints_before_the_fault(result)
    if kind == "loss":  # logged as it is: transformers would log the mean of earlier losses instead
        assert re.search(
            r"^finetune_train_loss\{[^}]*\} NaN$", (result.out / "metrics.prom").read_text(), re.M
        )


# --- the checks on their own ---------------------------------------------------------------------------


def progress_callback(tmp_path: Path, run: RunState) -> ProgressCallback:
    config = TrainerConfig.model_validate(
        {
            "job": {"namespace": "ns", "name": "bot"},
            "model": {"source": "m"},
            "dataset": {"source": "d.jsonl"},
            "method": {"type": "lora"},
            "report": {"file": str(tmp_path / "progress.json")},
        }
    )
    return ProgressCallback(TrainerMetrics("ns", "bot"), ProgressReporter(config), run, 100.0, 8.0, 10.0)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("logs", "fp16", "expected"),
    [
        ([{"loss": 2.0, "grad_norm": 1.0}], False, ""),
        ([{"loss": NAN, "grad_norm": 1.0}], False, "at step 3: loss nan"),
        ([{"loss": INF}], True, "at step 3: loss inf"),
        ([{"loss": 2.0, "grad_norm": NAN}], False, "at step 3: gradient norm nan"),
        ([{"loss": 2.0, "grad_norm": INF}], True, ""),  # fp16's loss scaling skips that step
        ([{"loss": 2.0}] * 3 + [{"loss": 25.0}], False, "loss spiked to 25, above 10x its minimum 2"),
        ([{"loss": 2.0}] * 2 + [{"loss": 25.0}], False, ""),  # early losses swing
        ([{"learning_rate": 1e-3}], False, ""),
    ],
)
def test_logged_values_that_stop_training(
    tmp_path: Path, logs: list[dict[str, float]], fp16: bool, expected: str
) -> None:
    run = RunState()
    callback = progress_callback(tmp_path, run)
    args: Any = TrainingArguments(output_dir=str(tmp_path), report_to="none", learning_rate=1e-3)
    args.fp16 = fp16  # set after construction: fp16 needs a GPU to validate
    state, control = TrainerState(global_step=3, max_steps=10), TrainerControl()
    for entry in logs:
        control.should_save = True
        callback.on_log(args, state, control, logs=entry)
    assert (expected in run.stop_reason) if expected else not run.stop_reason, run.stop_reason
    assert control.should_training_stop == bool(expected)
    assert control.should_save != bool(expected), "nothing is saved after a divergence"


def test_first_non_finite_and_non_finite_weight() -> None:
    import torch

    assert first_non_finite([]) is None
    assert first_non_finite([torch.tensor(1.0), torch.tensor(2.0)]) is None
    found = first_non_finite([torch.tensor(1.0), torch.tensor(INF), torch.tensor(NAN)])
    assert found == INF

    frozen, trained = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(frozen, trained)
    assert non_finite_weight(model) is None
    with torch.no_grad():
        frozen.weight.requires_grad_(False).fill_(NAN)  # not trained: not what a checkpoint adds
        assert non_finite_weight(model) is None
        trained.bias.fill_(NAN)
    bad = non_finite_weight(model)
    assert bad is not None and bad[0] == "1.bias" and math.isnan(bad[1])
