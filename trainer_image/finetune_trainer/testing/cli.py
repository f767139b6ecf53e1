"""Run `python -m finetune_trainer` on a tiny config in a subprocess (tests and the quickstart)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def base_config(
    model: Path, data: Path, out: Path, method_type: str = "lora", **overrides: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "job": {"namespace": "ns", "name": "tiny-job", "uid": "uid-1"},
        "model": {"source": str(model)},
        "dataset": {
            "source": str(data),
            "format": "alpaca",
            "chunking": {"maxTokens": 128, "packing": False},
        },
        "method": {"type": method_type, "reason": "test"},
        "hyperparameters": {"epochs": 1, "batchSize": 8, "learningRate": 1e-3, "loggingSteps": 2},
        "validation": {"maxNewTokens": 8, "maxGenerationSamples": 16},
        "report": {"file": str(out / "progress.json")},
        "metricsPort": 0,
        "outputDir": str(out),
    }
    for key, value in overrides.items():
        config[key] = value if not isinstance(value, dict) else {**config.get(key, {}), **value}
    return config


@dataclass
class Result:
    code: int
    log: str
    out: Path

    def report(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.out / "progress.json").read_text())
        return data


def run_trainer(
    config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None, timeout: int = 300
) -> Result:
    path = tmp / "config.json"
    path.write_text(json.dumps(config))
    full_env = {
        **os.environ,
        "JOB_ID": "uid-1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "--config", str(path)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout + proc.stderr, Path(config["outputDir"]))
