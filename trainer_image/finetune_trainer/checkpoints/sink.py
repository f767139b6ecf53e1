"""`S3Sink`: the trainer's `CheckpointSink` backed by a `CheckpointStore`.

save(): the folder is staged (hard links, so no copy of the bytes) and uploaded by the background
worker; the first checkpoint of a process is uploaded and verified before training goes on.
restore(): the newest verified checkpoint of this run, else `checkpoints.resumeFrom`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from finetune_trainer.checkpoints.describe import build_manifest, ensure_config
from finetune_trainer.checkpoints.errors import (
    CheckpointRestoreError,
    CheckpointVerificationError,
)
from finetune_trainer.checkpoints.fingerprint import read_fingerprint
from finetune_trainer.checkpoints.manifest import Fingerprint, Manifest, read_json
from finetune_trainer.checkpoints.parts import check_world_size
from finetune_trainer.checkpoints.store import (
    Checkpoint,
    CheckpointStore,
    CorruptCheckpointError,
    Selection,
    Skipped,
)
from finetune_trainer.checkpoints.uploader import BackgroundUploader, Task
from finetune_trainer.config import TrainerConfig
from finetune_trainer.report_model import CheckpointInfo

log = logging.getLogger(__name__)
STAGING = ".upload"
RESTORING = ".restoring"
METRICS_FILE = "metrics.json"
EventKind = Literal["committed", "verified", "invalid", "upload_failed", "skipped", "deleted"]


@dataclass(frozen=True)
class CheckpointEvent:
    """Something the job's status, events or metrics should show; `reason` names what went wrong.
    A committed event says how long storing the files and manifest took, and their size."""

    kind: EventKind
    uri: str
    step: int | None
    reason: str = ""
    upload_seconds: float = 0.0
    upload_bytes: int = 0
    committed_at: str | None = None  # the manifest's creation time, once committed

    @property
    def info(self) -> CheckpointInfo:
        verified = self.kind == "verified"
        return CheckpointInfo(uri=self.uri, step=self.step or 0, verified=verified, time=self.committed_at)


EventHandler = Callable[[CheckpointEvent], None]


@dataclass(frozen=True)
class _Failed:
    task: Task
    staged: Path
    work: Callable[[], None]
    uri: str


def stage(folder: Path) -> Path:
    """A hard-linked copy next to the folder: training may rotate the original away meanwhile."""
    target = folder.parent / STAGING / folder.name
    shutil.rmtree(target, ignore_errors=True)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            dest = target / path.relative_to(folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, dest)
            except OSError:  # another filesystem, or no hard links
                shutil.copy2(path, dest)
    target.mkdir(parents=True, exist_ok=True)
    return target


class S3Sink:
    world_size = 1  # processes whose per-rank state a checkpoint holds (`ranked.RankedS3Sink`: more)

    def __init__(
        self,
        store: CheckpointStore,
        config: TrainerConfig,
        on_event: EventHandler | None = None,
        uploader: BackgroundUploader | None = None,
    ) -> None:
        self.store, self.config = store, config
        self.verify = config.checkpoints.verify_restore
        self.on_event = on_event
        self.uploader = uploader or BackgroundUploader()
        self._verified_once = False
        self._last: Task | None = None
        self._failed: _Failed | None = None
        self._last_step = 0
        self._committed_at: dict[str, str] = {}  # uri -> manifest time, for status.checkpoint.time

    # --- restore ---------------------------------------------------------------------------------------

    def restore(self, work_dir: Path) -> Path | None:
        """A CheckpointStoreError (credentials, bucket) propagates: its message says what to fix."""
        reported: set[str] = set()
        while True:  # each pass that finds a corrupt download marks it invalid and looks again
            selection = self._select()
            self._report_skipped(selection.skipped, reported)
            if selection.checkpoint is None:
                return self._nothing(selection)
            try:
                return self._download(selection.checkpoint, work_dir)
            except CorruptCheckpointError as exc:
                self.store.mark_invalid(selection.checkpoint, f"corrupt: {exc}")

    def _select(self) -> Selection:
        own = self.store.latest_verified(verify_pending=True)
        resume_from = self.config.checkpoints.resume_from
        if own.checkpoint is not None or not resume_from:
            return own
        try:
            selection = self.store.resolve(resume_from)
        except ValueError as exc:
            raise CheckpointRestoreError(str(exc)) from None
        selection.skipped[:0] = own.skipped
        return selection

    def _report_skipped(self, skipped: Iterable[Skipped], reported: set[str]) -> None:
        for item in skipped:
            if item.uri not in reported:
                reported.add(item.uri)
                log.warning("skipping checkpoint %s: %s", item.uri, item.reason)
                self._emit(CheckpointEvent("skipped", item.uri, item.step, item.reason))

    def _nothing(self, selection: Selection) -> Path | None:
        resume_from = self.config.checkpoints.resume_from
        if resume_from and resume_from != "latest":
            reasons = "; ".join(f"{s.uri}: {s.reason}" for s in selection.skipped) or "nothing found"
            raise CheckpointRestoreError(
                f"checkpoints.resumeFrom: got {resume_from!r}: no verified checkpoint to resume from "
                f"({reasons}) (fix: point it at a committed checkpoint folder, or use 'latest')"
            )
        log.info("no verified checkpoint to resume from: starting from the base model")
        return None

    def _download(self, checkpoint: Checkpoint, work_dir: Path) -> Path:
        target = work_dir / f"checkpoint-{checkpoint.step or 0}"
        scratch = work_dir / RESTORING
        shutil.rmtree(scratch, ignore_errors=True)
        self._fetch(checkpoint, scratch)
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)  # only a complete, checked folder gets the name training resumes from
        self._last_step = checkpoint.step or 0
        log.info("restored checkpoint %s into %s", checkpoint.uri, target)
        return target

    def _fetch(self, checkpoint: Checkpoint, target: Path) -> None:
        check_world_size(self.store.read_manifest(checkpoint), self.world_size, checkpoint.uri)
        self.store.download(checkpoint, target, self._wanted_on_restore)

    def _wanted_on_restore(self, path: str) -> bool:
        return True

    # --- save ------------------------------------------------------------------------------------------

    def save(self, local_dir: Path, step: int, metrics: Mapping[str, float]) -> CheckpointInfo | None:
        staged = stage(local_dir)
        ensure_config(staged, self.config)
        self._last_step = max(self._last_step, step)
        verify_now = self.verify and not self._verified_once
        work = partial(self._upload, staged, step, dict(metrics), verify_now)
        task = self._task(f"step-{step}", staged, work, self._uri(step))
        info = CheckpointInfo(uri=self._uri(step), step=step, verified=False)
        if not verify_now:
            self.uploader.submit(task)
            return info
        self.uploader.run_now(task)  # the first checkpoint: training waits until it restores
        self._verified_once = True
        return info.model_copy(update={"verified": True, "time": self._committed_at.get(info.uri)})

    def save_final(self, local_dir: Path) -> CheckpointInfo | None:
        self.uploader.wait()
        staged = stage(local_dir)
        ensure_config(staged, self.config)
        final = read_json(staged / METRICS_FILE).get("final", {})
        metrics = {k: float(v) for k, v in final.items()} if isinstance(final, dict) else {}
        result: list[CheckpointInfo] = []
        work = partial(self._upload_final, staged, metrics, result)
        uri = f"s3://{self.store.location.bucket}/{self.store.location.final_key}"
        self.uploader.run_now(self._task("final", staged, work, uri))
        return result[0]

    def defer_verification(self) -> None:
        self.verify = False

    def wait(self) -> None:
        """Block until every checkpoint handed over is stored (or has failed)."""
        self.uploader.wait()

    def close(self) -> None:
        """Drain uploads; retry the newest checkpoint once if it failed; raise if it still fails."""
        self.uploader.wait()
        failed, self._failed = self._failed, None
        try:
            if failed is not None and failed.task is self._last:
                log.warning("retrying the upload of %s before exit", failed.uri)
                self.uploader.run_now(self._task(failed.task.name, failed.staged, failed.work, failed.uri))
        finally:
            self.uploader.close()

    def _task(self, name: str, staged: Path, work: Callable[[], None], uri: str) -> Task:
        task = Task(name, run=work, discard=partial(shutil.rmtree, staged, True))
        task.run = partial(self._guarded, _Failed(task, staged, work, uri))
        self._last = task
        return task

    def _guarded(self, attempt: _Failed) -> None:
        """On the worker: keep the newest failed upload's local copy for one retry at close()."""
        try:
            attempt.work()
        except CheckpointVerificationError:
            raise
        except Exception as exc:
            log.error("%s was not stored: %s", attempt.uri, exc)
            self._emit(CheckpointEvent("upload_failed", attempt.uri, self._step(attempt.task), str(exc)))
            self._forget_failed(keep=attempt.staged)
            self._failed = attempt
            raise
        self._forget_failed(keep=attempt.staged)

    def _forget_failed(self, keep: Path) -> None:
        if self._failed is not None and self._failed.staged != keep:
            shutil.rmtree(self._failed.staged, ignore_errors=True)
        self._failed = None

    @staticmethod
    def _step(task: Task) -> int | None:
        name = task.name.removeprefix("step-")
        return int(name) if name.isdigit() else None

    def _fingerprint(self, staged: Path) -> Fingerprint | None:
        """The live model's, when training recorded it; else the saved folder's, loaded fresh."""
        recorded = read_fingerprint(staged)
        check = self.store.restore_check
        if recorded is not None or not self.verify or check is None:
            return recorded
        return dict(check(staged))

    def _upload(self, staged: Path, step: int, metrics: dict[str, float], verify: bool) -> None:
        manifest = build_manifest(staged, self.config, step, metrics, self._fingerprint(staged))
        checkpoint = self._commit(staged, manifest, step)
        if self.verify:
            self._verify(checkpoint, raise_on_failure=verify)
        for deleted in self.store.apply_retention(self.config.checkpoints.keep):
            self._emit(CheckpointEvent("deleted", deleted.uri, deleted.step))

    def _upload_final(self, staged: Path, metrics: dict[str, float], result: list[CheckpointInfo]) -> None:
        fingerprint = self._fingerprint(staged)
        manifest = build_manifest(staged, self.config, self._last_step, metrics, fingerprint, kind="final")
        checkpoint = self._commit(staged, manifest, self._last_step)
        verified = self._verify(checkpoint, raise_on_failure=True) if self.verify else False
        result.append(
            CheckpointInfo(uri=checkpoint.uri, step=self._last_step, verified=verified, time=manifest.created)
        )

    def _commit(self, staged: Path, manifest: Manifest, step: int) -> Checkpoint:
        started = time.monotonic()
        checkpoint = self.store.commit(staged, manifest)
        seconds = time.monotonic() - started
        self._committed_at[checkpoint.uri] = manifest.created
        shutil.rmtree(staged, ignore_errors=True)  # only now: the manifest is committed
        size = sum(entry.size for entry in manifest.files)
        self._emit(
            CheckpointEvent(
                "committed",
                checkpoint.uri,
                step,
                upload_seconds=seconds,
                upload_bytes=size,
                committed_at=manifest.created,
            )
        )
        return checkpoint

    def _verify(self, checkpoint: Checkpoint, raise_on_failure: bool) -> bool:
        result = self.store.verify(checkpoint)
        kind: EventKind = "verified" if result.ok else "invalid"
        at = self._committed_at.get(checkpoint.uri)
        self._emit(CheckpointEvent(kind, checkpoint.uri, checkpoint.step, result.reason, committed_at=at))
        if not result.ok and raise_on_failure:
            raise CheckpointVerificationError(
                f"checkpoint {checkpoint.uri} does not restore: {result.reason} (fix: see the trainer log; "
                "set checkpoints.verifyRestore: false only if this check itself is at fault)"
            )
        return result.ok

    def _uri(self, step: int) -> str:
        return f"s3://{self.store.location.bucket}/{self.store.location.step_key(step)}"

    def _emit(self, event: CheckpointEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("checkpoint event handler failed")
