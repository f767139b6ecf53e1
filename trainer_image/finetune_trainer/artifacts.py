"""Files saved next to checkpoints and the final artifact, and the final artifact itself."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune_trainer.config import TrainerConfig
from finetune_trainer.data.report import DataReport

TEMPLATE_FILE = "prompt_template.jinja"
CONFIG_FILE = "training_config.json"
DATA_REPORT_FILE = "data_report.json"
ENVIRONMENT_FILE = "environment.json"
BASELINE_FILE = "baseline.json"
METRICS_FILE = "metrics.json"


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def write_sidecars(
    folder: Path, config: TrainerConfig, template: str, report: DataReport, environment: Mapping[str, Any]
) -> None:
    """The config, exact prompt template, data report and library versions, for reproducibility."""
    folder.mkdir(parents=True, exist_ok=True)
    if template:  # speech models have no prompt template
        (folder / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    (folder / CONFIG_FILE).write_text(config.to_json() + "\n", encoding="utf-8")
    write_json(folder / DATA_REPORT_FILE, report.model_dump(by_alias=True))
    write_json(folder / ENVIRONMENT_FILE, dict(environment))


def save_final(
    model: Any,
    tokenizer: Any,
    folder: Path,
    sidecars: Path,
    metrics: Mapping[str, Mapping[str, float]],
    state_dict: Mapping[str, Any] | None = None,
) -> Path:
    """Adapter (lora, qlora) or full weights in safetensors, the tokenizer with its chat template,
    and the sidecar files. `state_dict` replaces the model's own weights (gathered ZeRO-3 shards)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    weights = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(folder, safe_serialization=True, **weights)
    tokenizer.save_pretrained(folder)
    for sidecar in sidecars.glob("*.j*"):
        shutil.copy2(sidecar, folder / sidecar.name)
    write_json(folder / METRICS_FILE, {k: dict(v) for k, v in metrics.items()})
    return folder
