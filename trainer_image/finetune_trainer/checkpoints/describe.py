"""Build a manifest from a local checkpoint folder and the run's config."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from finetune_trainer.artifacts import CONFIG_FILE, DATA_REPORT_FILE
from finetune_trainer.checkpoints.manifest import Fingerprint, JobRef, Manifest, hash_folder, read_json
from finetune_trainer.config import TrainerConfig

TRAINER_STATE = "trainer_state.json"  # written by transformers' Trainer in every checkpoint-N folder


@functools.cache
def _versions() -> dict[str, str]:
    from finetune_trainer.runtime import library_versions

    return library_versions()


def config_sha256(config: TrainerConfig) -> str:
    return hashlib.sha256(config.to_json().encode()).hexdigest()


def ensure_config(folder: Path, config: TrainerConfig) -> None:
    """The training config travels with every checkpoint."""
    target = folder / CONFIG_FILE
    if not target.is_file():
        target.write_text(config.to_json() + "\n", encoding="utf-8")


def eval_metrics(folder: Path, step: int) -> dict[str, float]:
    """The newest evaluation at or before `step`, from transformers' trainer_state.json."""
    history = read_json(folder / TRAINER_STATE).get("log_history", [])
    for entry in reversed(history if isinstance(history, list) else []):
        if isinstance(entry, dict) and int(entry.get("step", 0)) <= step and "eval_loss" in entry:
            return {k: float(v) for k, v in entry.items() if k.startswith("eval_") and _number(v)}
    return {}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def build_manifest(
    folder: Path,
    config: TrainerConfig,
    step: int,
    metrics: Mapping[str, float],
    fingerprint: Fingerprint | None,
    kind: Literal["step", "final"] = "step",
) -> Manifest:
    state = read_json(folder / TRAINER_STATE)
    epoch = state.get("epoch")
    data = read_json(folder / DATA_REPORT_FILE)
    return Manifest(
        kind=kind,
        job=JobRef(namespace=config.job.namespace, name=config.job.name, uid=config.job.uid),
        step=step,
        epoch=float(epoch) if _number(epoch) else None,  # type: ignore[arg-type]
        metrics={**{k: float(v) for k, v in metrics.items()}, **eval_metrics(folder, step)},
        config_sha256=config_sha256(config),
        versions=_versions(),
        seeds={"training": config.hyperparameters.seed, "dataSplit": config.dataset.split.seed},
        data_fingerprint=str(data.get("fingerprint", "")),
        restore_fingerprint=fingerprint,
        files=hash_folder(folder),
    )
