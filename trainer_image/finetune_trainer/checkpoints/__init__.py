"""Checkpoints in S3-compatible storage: committed (files, then MANIFEST.json), verified, resumable.

`build_sink(config)` is what `finetune_trainer.sink.build_sink` loads when a bucket is configured.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from finetune_trainer.checkpoints.client import TransferSettings
from finetune_trainer.checkpoints.errors import (
    CheckpointConflictError,
    CheckpointRestoreError,
    CheckpointStoreError,
    CheckpointVerificationError,
)
from finetune_trainer.checkpoints.fingerprint import RestoreCheck, write_fingerprint
from finetune_trainer.checkpoints.manifest import Manifest
from finetune_trainer.checkpoints.ranked import RankedS3Sink
from finetune_trainer.checkpoints.sink import CheckpointEvent, EventHandler, S3Sink
from finetune_trainer.checkpoints.store import Checkpoint, CheckpointStore, Selection, Skipped, Tolerance
from finetune_trainer.config import TrainerConfig

log = logging.getLogger(__name__)

__all__ = [
    "Checkpoint",
    "CheckpointConflictError",
    "CheckpointEvent",
    "CheckpointRestoreError",
    "CheckpointStore",
    "CheckpointStoreError",
    "CheckpointVerificationError",
    "Manifest",
    "RankedS3Sink",
    "RestoreCheck",
    "S3Sink",
    "Selection",
    "Skipped",
    "Tolerance",
    "TransferSettings",
    "build_restore_check",
    "build_sink",
    "write_fingerprint",
]


def build_restore_check(config: TrainerConfig, base_model_path: str | None = None) -> RestoreCheck | None:
    """The restore check for this job's method; None where only file hashes can be checked."""
    if not config.checkpoints.verify_restore:
        return None
    if config.dataset.format == "audio":
        log.info("restore fingerprints cover causal language models; audio checkpoints are checked by sha256")
        return None
    if config.method.type == "full":
        return RestoreCheck(dtype=config.model.dtype)
    return RestoreCheck(load_base=functools.partial(_load_base, config, base_model_path))


@functools.cache
def _resolved_base(config_json: str, output_dir: str) -> str:
    from finetune_trainer.methods.loading import resolve_model_path

    config = TrainerConfig.model_validate_json(config_json)
    return resolve_model_path(config.model, config.checkpoints.store, Path(output_dir))


def _load_base(config: TrainerConfig, base_model_path: str | None) -> Any:
    from finetune_trainer.methods.loading import load_model

    path = base_model_path or _resolved_base(config.to_json(), config.output_dir)
    return load_model(path, config.model, config.method)


def build_sink(
    config: TrainerConfig,
    on_event: EventHandler | None = None,
    base_model_path: str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> S3Sink:
    """The S3 checkpoint sink of this job run's process `rank` of `world_size`; credentials come
    from the environment only."""
    store = CheckpointStore(
        config.checkpoints.store,
        config.job,
        restore_check=build_restore_check(config, base_model_path) if rank == 0 else None,
        scratch_dir=Path(config.output_dir) / ".verify",
    )
    if world_size > 1:
        return RankedS3Sink(store, config, rank, world_size, on_event=on_event)
    return S3Sink(store, config, on_event=on_event)
