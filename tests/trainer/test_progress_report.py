"""The phase and progress a user reads in the job's status, as the trainer reports them: evaluations
(the baseline, the final one) never show as training, and the loss stays a short number."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerControl, TrainerState, TrainingArguments

from finetune_trainer.callbacks import ProgressCallback, RunState
from finetune_trainer.config import TrainerConfig
from finetune_trainer.report_model import Phase, Progress
from finetune_trainer.reporting import ProgressReporter, TrainerMetrics

EVAL_LOG = {"eval_loss": 2.5, "eval_runtime": 1.2, "eval_samples_per_second": 40.0, "epoch": 0.0}


def reporter(tmp_path: Path) -> ProgressReporter:
    config = TrainerConfig.model_validate(
        {
            "job": {"namespace": "ns", "name": "bot"},
            "model": {"source": "m"},
            "dataset": {"source": "d.jsonl"},
            "method": {"type": "lora"},
            "report": {"file": str(tmp_path / "progress.json")},
        }
    )
    return ProgressReporter(config, min_interval_s=0.0)


def reported(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "progress.json").read_text())  # type: ignore[no-any-return]


def log(callback: ProgressCallback, tmp_path: Path, logs: dict[str, float], step: int, total: int) -> None:
    args: Any = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = TrainerState()
    state.global_step, state.max_steps = step, total
    callback.on_log(args, state, TrainerControl(), logs=dict(logs))


def test_evaluations_keep_their_phase_and_training_keeps_its_last_loss(tmp_path: Path) -> None:
    report = reporter(tmp_path)
    callback = ProgressCallback(TrainerMetrics("ns", "bot"), report, RunState(), 100.0, 8.0, 10.0)

    # The baseline: Trainer.evaluate logs its metrics before any training step (max_steps 0).
    report.update(phase=Phase.BASELINE, force=True)
    log(callback, tmp_path, EVAL_LOG, step=0, total=0)
    assert reported(tmp_path)["phase"] == "Baseline"
    assert "progress" not in reported(tmp_path), "no 'Training 0/0' while the baseline runs"

    report.update(phase=Phase.TRAINING, force=True)
    log(callback, tmp_path, {"loss": 1.4201694488525392, "learning_rate": 1e-4}, step=10, total=20)
    assert reported(tmp_path)["progress"]["loss"] == 1.4202
    # The end-of-training summary has no "loss": the last one stays on show.
    log(callback, tmp_path, {"train_runtime": 12.0, "train_loss": 1.6}, step=20, total=20)
    assert reported(tmp_path)["progress"] == {**reported(tmp_path)["progress"], "step": 20, "loss": 1.4202}

    # The final evaluation after the last step does not flip the phase back to Training.
    report.update(phase=Phase.EVALUATING, force=True)
    log(callback, tmp_path, EVAL_LOG, step=20, total=20)
    assert reported(tmp_path)["phase"] == "Evaluating"


class SlowApiServer:
    """Stands in for the client of an API server that takes `delay` seconds per ConfigMap patch."""

    def __init__(self, delay: float) -> None:
        self.delay, self.documents = delay, []  # type: ignore[var-annotated]

    def patch_namespaced_config_map(self, name: str, namespace: str, body: Any, **_: Any) -> None:
        time.sleep(self.delay)
        self.documents.append(json.loads(body["data"]["progress.json"]))


def test_a_slow_api_server_never_holds_up_a_training_step(tmp_path: Path) -> None:
    config = TrainerConfig.model_validate(
        {
            "job": {"namespace": "ns", "name": "bot"},
            "model": {"source": "m"},
            "dataset": {"source": "d.jsonl"},
            "method": {"type": "lora"},
            "report": {"configMap": "bot-progress"},
        }
    )
    report = ProgressReporter(config, min_interval_s=0.0)
    server = SlowApiServer(delay=1.0)
    report._api = server
    report.update(phase=Phase.TRAINING, force=True)  # a phase change is written before it returns
    assert [d["phase"] for d in server.documents] == ["Training"]

    started = time.monotonic()
    for step in range(1, 21):
        report.update(progress=Progress(step=step, total_steps=20, loss=1.0))
    assert time.monotonic() - started < 0.5, "twenty steps' reports took a slow write each"

    def newest() -> int:
        return int(server.documents[-1].get("progress", {}).get("step", 0)) if server.documents else 0

    deadline = time.monotonic() + 10
    while newest() != 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert newest() == 20, "the newest report is written, not every one in turn"
    assert len(server.documents) <= 4
