"""The seam between training and checkpoint storage.

Training saves checkpoints and the final artifact to local folders and hands them to a
`CheckpointSink`. `LocalSink` keeps them on local disk (and resumes from there after a
restart on the same volume). A remote store plugs in as `finetune_trainer.checkpoints`
providing `build_sink(config, on_event=..., base_model_path=...) -> CheckpointSink`.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from finetune_trainer.config import TrainerConfig
from finetune_trainer.redact import redact
from finetune_trainer.report_model import MAX_CHECKPOINT_PROBLEMS, CheckpointInfo, CheckpointProblem

if TYPE_CHECKING:
    from finetune_trainer.reporting import ProgressReporter, TrainerMetrics

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"checkpoint-(\d+)$")


class CheckpointRestoreError(Exception):
    """A checkpoint to resume from exists but cannot be restored (exit 5)."""


class CheckpointStoreUnusableError(Exception):
    """The checkpoint store cannot be used as configured: credentials, bucket, endpoint (exit 1)."""


class StoreRefusedError(Exception):
    """An object store refused the job's credentials or access, or has no such bucket: no retry
    changes that (exit 7, which the Job's pod failure policy makes final)."""


class CheckpointEventLike(Protocol):
    """What the remote store reports about a checkpoint (`checkpoints.CheckpointEvent`)."""

    @property
    def kind(self) -> str: ...
    @property
    def uri(self) -> str: ...
    @property
    def step(self) -> int | None: ...
    @property
    def reason(self) -> str: ...
    @property
    def upload_seconds(self) -> float: ...
    @property
    def upload_bytes(self) -> int: ...
    @property
    def info(self) -> CheckpointInfo: ...


PROBLEM_EVENTS = {
    "skipped": "skipped",
    "invalid": "failed verification",
    "upload_failed": "was not stored",
}


class CheckpointSink(Protocol):
    def restore(self, work_dir: Path) -> Path | None:
        """Before training: put the latest verified checkpoint under work_dir and return its folder."""
        ...

    def save(self, local_dir: Path, step: int, metrics: Mapping[str, float]) -> CheckpointInfo | None:
        """After each save: the folder holds weights, optimizer state and sidecar files."""
        ...

    def save_final(self, local_dir: Path) -> CheckpointInfo | None:
        """The final artifact folder."""
        ...

    def defer_verification(self) -> None:
        """Commit later checkpoints without verifying them: a preempted pod has seconds left, and
        the next run verifies a pending checkpoint before it resumes from it."""
        ...

    def agreement(self) -> dict[str, str]:
        """Multi-process jobs, on rank 0 after `restore`: what the other ranks need to restore the
        same checkpoint (`restore_agreed`)."""
        ...

    def restore_agreed(self, work_dir: Path, agreed: Mapping[str, str]) -> Path | None:
        """Multi-process jobs, on the other ranks: restore the checkpoint rank 0 chose."""
        ...

    def close(self) -> None:
        """Wait until everything handed over is stored."""
        ...


def latest_local_checkpoint(work_dir: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in work_dir.glob("checkpoint-*") if (m := _STEP_DIR.search(p.name))]
    return max(steps)[1] if steps else None


class LocalSink:
    def __init__(self, resume: bool = True) -> None:
        self._resume = resume
        self._restored: Path | None = None

    def restore(self, work_dir: Path) -> Path | None:
        self._restored = latest_local_checkpoint(work_dir) if self._resume else None
        return self._restored

    def save(self, local_dir: Path, step: int, metrics: Mapping[str, float]) -> CheckpointInfo | None:
        return CheckpointInfo(uri=local_dir.resolve().as_uri(), step=step, verified=False)

    def save_final(self, local_dir: Path) -> CheckpointInfo | None:
        return None

    def defer_verification(self) -> None:
        return None

    def agreement(self) -> dict[str, str]:
        return {"folder": self._restored.name if self._restored else ""}

    def restore_agreed(self, work_dir: Path, agreed: Mapping[str, str]) -> Path | None:
        """The same folder on this rank's disk: without a store, each rank keeps its own files."""
        folder = agreed.get("folder", "")
        if not folder:
            return None
        if not (work_dir / folder).is_dir():
            raise CheckpointRestoreError(
                f"{work_dir / folder}: rank 0 resumes from {folder}, but this rank has no local copy "
                "(fix: set checkpoints.store so that every rank's part of each checkpoint is stored)"
            )
        return work_dir / folder

    def close(self) -> None:
        return None


def report_checkpoint_events(
    reporter: ProgressReporter, metrics: TrainerMetrics | None = None
) -> Callable[[CheckpointEventLike], None]:
    """Committed and verified checkpoints go to the report's checkpoint and to the metrics; problems
    to the report's message, so the job's status shows which checkpoint was not used and why."""

    def handle(event: CheckpointEventLike) -> None:
        if metrics is not None and event.kind == "committed":
            metrics.checkpoint_committed(event.step or 0, event.upload_seconds, event.upload_bytes)
        if metrics is not None and event.kind == "verified":
            metrics.checkpoint_verified(event.step)
        if event.kind in ("committed", "verified"):
            reporter.update(checkpoint=event.info)
        elif event.kind in PROBLEM_EVENTS:
            notice = f"checkpoint {event.uri} {PROBLEM_EVENTS[event.kind]}: {event.reason}"
            log.warning("%s", notice)
            problem = CheckpointProblem(uri=event.uri, problem=event.kind, reason=redact(event.reason))
            problems = [*reporter.report.checkpoint_problems, problem][-MAX_CHECKPOINT_PROBLEMS:]
            reporter.update(checkpoint_problems=problems)
            reporter.notice(notice)  # forces the write

    return handle


def build_sink(
    config: TrainerConfig,
    reporter: ProgressReporter,
    base_model_path: str | None = None,
    metrics: TrainerMetrics | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> CheckpointSink:
    """The remote store when one is configured and available, else local disk; for process `rank`
    of a job of `world_size` processes (each stores its own part of every checkpoint).

    `base_model_path` is the resolved (already downloaded) base model, which restore checks of
    LoRA adapters load instead of fetching the base model a second time.
    """
    if not config.checkpoints.store.bucket:
        return LocalSink(resume=rank == 0)
    try:
        module = importlib.import_module("finetune_trainer.checkpoints")
    except ModuleNotFoundError:
        log.warning(
            "checkpoints.store.bucket is set but this image has no remote checkpoint store; local only"
        )
        return LocalSink(resume=rank == 0)
    sink: CheckpointSink = module.build_sink(
        config,
        on_event=report_checkpoint_events(reporter, metrics),
        base_model_path=base_model_path,
        rank=rank,
        world_size=world_size,
    )
    return sink
