"""Run `python -m finetune_trainer` on a tiny config in a subprocess (tests and the quickstart)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
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


def trainer_env(env: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "JOB_ID": "uid-1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }


def run_trainer(
    config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None, timeout: int = 300
) -> Result:
    path = tmp / "config.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "--config", str(path)],
        capture_output=True,
        text=True,
        env=trainer_env(env),
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout + proc.stderr, Path(config["outputDir"]))


@dataclass
class Running:
    """A trainer started in the background, to be signalled mid-run."""

    process: subprocess.Popen[bytes]
    log_path: Path
    out: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        """The first match of a regular expression in the log, waiting for it to appear."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in the trainer log:\n{self.log()[-3000:]}")

    def finish(self, timeout: float = 300.0) -> Result:
        code = self.process.wait(timeout=timeout)
        return Result(code, self.log(), self.out)


def start_trainer(config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None) -> Running:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.json"
    path.write_text(json.dumps(config))
    log_path = tmp / "trainer.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "finetune_trainer", "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=trainer_env(env),
        )
    return Running(process, log_path, Path(config["outputDir"]))
