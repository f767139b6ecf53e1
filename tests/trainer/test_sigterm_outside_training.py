"""SIGTERM is handled from the first line of `python -m finetune_trainer`: outside training the run
stops within seconds with exit 76; in training it still saves a checkpoint first and exits 75."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_trainer import termination
from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.testing.cli import Running, base_config, start_trainer, trainer_env
from finetune_trainer.testing.tiny import distinct_records, synthetic_dataset, write_jsonl

PROMPT_EXIT_S = 5.0


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; any still running at its end (a failed test) are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for_phase(run: Running, phase: str, timeout: float = 180.0) -> None:
    report = run.out / "progress.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.process.poll() is None:
        if report.is_file() and json.loads(report.read_text()).get("phase") == phase:
            return
        time.sleep(0.05)
    raise AssertionError(f"phase {phase} not reported:\n{run.log()[-3000:]}")


def test_sigterm_while_preparing_data_stops_within_seconds(
    tiny_model: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    data = write_jsonl(distinct_records(100_000), tmp_path / "train.jsonl")
    run = start_trainer(base_config(tiny_model, data, tmp_path / "out", "lora"), tmp_path / "run")
    processes.append(run.process)
    wait_for_phase(run, "Preparing")
    time.sleep(1.0)  # well into cleaning the data
    run.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    result = run.finish(timeout=60)
    assert time.monotonic() - signalled < PROMPT_EXIT_S, result.log[-3000:]
    assert result.code == ExitCode.PREEMPTED_OUTSIDE_TRAINING, result.log[-3000:]
    assert "SIGTERM received outside training: stopping now" in result.log
    report = result.report()
    assert report["phase"] == "Preparing", "the operator reads the end of the run from the Job"
    assert report["message"].startswith("stopped by SIGTERM in phase preparing: nothing new to checkpoint")


def test_sigterm_during_the_baseline_stops_within_seconds(
    tiny_model: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """The base model's evaluation on a large test split, with generation for the task metrics:
    minutes of work that a preempted pod must not spend its grace period on."""
    data = write_jsonl(synthetic_dataset(8000, seed=3), tmp_path / "train.jsonl")
    config = base_config(
        tiny_model,
        data,
        tmp_path / "out",
        "lora",
        goal={"metrics": ["eval_loss", "exact_match"]},
        dataset={"split": {"validation": 0.05, "test": 0.4}},
        validation={"maxNewTokens": 32, "maxGenerationSamples": 10000},
    )
    run = start_trainer(config, tmp_path / "run")
    processes.append(run.process)
    wait_for_phase(run, "Baseline")
    time.sleep(1.0)  # well into the evaluation
    run.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    result = run.finish(timeout=60)
    assert time.monotonic() - signalled < PROMPT_EXIT_S, result.log[-3000:]
    assert result.code == ExitCode.PREEMPTED_OUTSIDE_TRAINING, result.log[-3000:]
    assert "baseline: {" not in result.log, "premise: the baseline had not finished"
    report = result.report()
    assert report["phase"] == "Baseline" and "progress" not in report, "Baseline, never 'Training 0/0'"
    assert report["message"].startswith("stopped by SIGTERM in phase baseline: nothing new to checkpoint")


def test_sigterm_in_training_still_saves_a_checkpoint_first(
    tiny_model: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    data = write_jsonl(synthetic_dataset(200, seed=0), tmp_path / "train.jsonl")
    config = base_config(
        tiny_model,
        data,
        tmp_path / "out",
        "lora",
        hyperparameters={"maxSteps": 400, "batchSize": 2, "loggingSteps": 1},
        checkpoints={"everySteps": 1000},
    )
    run = start_trainer(config, tmp_path / "run")
    processes.append(run.process)
    run.wait_for(r'progress: \{"step":3,', timeout=240)
    run.process.send_signal(signal.SIGTERM)
    result = run.finish(timeout=120)
    assert result.code == ExitCode.PREEMPTED_CHECKPOINTED, result.log[-3000:]
    saved = list((result.out / "checkpoints").glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "adapter_model.safetensors").is_file(), saved
    assert "preempted: checkpoint of step" in result.report()["message"]


# A phase that does not stop on `Terminated`, as code stuck in a native call would not.
STUCK = """
import time
from finetune_trainer import termination

termination.stop_on_sigterm()
try:
    print("ready", flush=True)
    time.sleep(120)
except termination.Terminated:
    time.sleep(120)
"""


def test_a_phase_that_does_not_stop_is_ended_by_the_watchdog(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=trainer_env()
    )
    processes.append(process)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == b"ready"
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = process.wait(timeout=termination.STOP_DEADLINE_S + 30)
    elapsed = time.monotonic() - signalled
    assert code == ExitCode.PREEMPTED_OUTSIDE_TRAINING
    assert termination.STOP_DEADLINE_S <= elapsed < termination.STOP_DEADLINE_S + 5
    assert b"exiting now with code 76" in process.stdout.read()
