"""`RankedS3Sink`: the checkpoint sink of one rank of a multi-process (multi-pod) job.

Every rank stores its own part of each checkpoint in the background; rank 0 commits the manifest
once all parts are stored, verifies and applies retention (`parts` describes the protocol).
On resume rank 0 chooses the checkpoint, as a single process does, and the other ranks restore
the one it chose (`agreement`, `restore_agreed`), each downloading the shared files and its own.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from finetune_trainer import termination
from finetune_trainer.checkpoints import layout
from finetune_trainer.checkpoints.describe import build_manifest
from finetune_trainer.checkpoints.errors import CheckpointStoreError
from finetune_trainer.checkpoints.manifest import FileEntry, hash_folder
from finetune_trainer.checkpoints.parts import (
    PartRecord,
    belongs_to,
    needed_by,
    parts_wait_seconds,
    upload_part,
    wait_for_parts,
)
from finetune_trainer.checkpoints.sink import CheckpointEvent, EventHandler, S3Sink
from finetune_trainer.checkpoints.store import Checkpoint, CheckpointStore, CorruptCheckpointError
from finetune_trainer.checkpoints.uploader import BackgroundUploader
from finetune_trainer.config import TrainerConfig

log = logging.getLogger(__name__)


class RankedS3Sink(S3Sink):
    def __init__(
        self,
        store: CheckpointStore,
        config: TrainerConfig,
        rank: int,
        world_size: int,
        on_event: EventHandler | None = None,
        uploader: BackgroundUploader | None = None,
    ) -> None:
        super().__init__(store, config, on_event=on_event, uploader=uploader)
        self.rank, self.world_size = rank, world_size
        self.attempt = uuid.uuid4().hex[:12]  # rank 0's is the one that counts (`agreement`)
        self.restored: Checkpoint | None = None
        self.parts_timeout: float | None = None  # rank 0's wait for the others' parts; None: derived
        if rank != 0:
            self.verify = False  # rank 0 verifies the whole checkpoint

    # --- restore ---------------------------------------------------------------------------------------

    def restore(self, work_dir: Path) -> Path | None:
        if self.rank != 0:
            return None  # the other ranks restore what rank 0 chose: `restore_agreed`
        return super().restore(work_dir)

    def _fetch(self, checkpoint: Checkpoint, target: Path) -> None:
        super()._fetch(checkpoint, target)
        self.restored = checkpoint

    def _wanted_on_restore(self, path: str) -> bool:
        return needed_by(self.rank)(path)

    def agreement(self) -> dict[str, str]:
        """What rank 0 tells the other ranks: the checkpoint to restore and the upload attempt."""
        return {"attempt": self.attempt, "uri": self.restored.uri if self.restored else ""}

    def restore_agreed(self, work_dir: Path, agreed: Mapping[str, str]) -> Path | None:
        self.attempt = agreed["attempt"]
        if not agreed.get("uri"):
            return None
        bucket, key = layout.parse_uri(agreed["uri"], "checkpoint")
        checkpoint = Checkpoint(bucket, key, layout.step_of(key), committed=True)
        try:
            return self._download(checkpoint, work_dir)
        except CorruptCheckpointError as exc:
            self.store.mark_invalid(checkpoint, f"corrupt: {exc}")
            raise CheckpointStoreError(
                f"checkpoint {checkpoint.uri}: rank {self.rank}'s files do not match the manifest: {exc} "
                "(fix: none needed: it is marked invalid, and the next retry resumes from an older one)"
            ) from None

    # --- save ------------------------------------------------------------------------------------------

    def _upload(self, staged: Path, step: int, metrics: dict[str, float], verify: bool) -> None:
        """On the worker: store this rank's part; on rank 0 then wait for the others' and commit."""
        if self.rank != 0:
            self._store_part(staged, step, [e for e in hash_folder(staged) if belongs_to(self.rank)(e.path)])
            shutil.rmtree(staged, ignore_errors=True)
            return
        checkpoint = self._commit_all_parts(staged, step, metrics)
        if self.verify:
            self._verify(checkpoint, raise_on_failure=verify)
        for deleted in self.store.apply_retention(self.config.checkpoints.keep):
            self._emit(CheckpointEvent("deleted", deleted.uri, deleted.step))

    def _commit_all_parts(self, staged: Path, step: int, metrics: dict[str, float]) -> Checkpoint:
        """Rank 0: store its part, wait for every other rank's, then write the manifest of them all."""
        started = time.monotonic()
        manifest = build_manifest(staged, self.config, step, metrics, self._fingerprint(staged))
        self._store_part(staged, step, [e for e in manifest.files if belongs_to(0)(e.path)])
        key = self.store.key_for(step)
        timeout = self.parts_timeout
        if timeout is None:
            timeout = parts_wait_seconds(time.monotonic() - started, preempted=termination.requested())
        records = wait_for_parts(self.store.objects, key, self.attempt, self.world_size, timeout)
        files = [entry for record in records for entry in record.files]
        manifest = manifest.model_copy(update={"files": files, "world_size": self.world_size})
        checkpoint = self.store.commit_stored(manifest)
        shutil.rmtree(staged, ignore_errors=True)  # only now: the manifest is committed
        size = sum(entry.size for entry in files)
        seconds = time.monotonic() - started
        self._emit(
            CheckpointEvent("committed", checkpoint.uri, step, upload_seconds=seconds, upload_bytes=size)
        )
        return checkpoint

    def _store_part(self, staged: Path, step: int, files: list[FileEntry]) -> None:
        record = PartRecord(
            rank=self.rank, world_size=self.world_size, attempt=self.attempt, step=step, files=files
        )
        upload_part(self.store.objects, staged, self.store.key_for(step), record)
