"""Checkpoints of a multi-process job: every rank stores its own part, rank 0 commits the whole.

DeepSpeed writes some files of a checkpoint on every rank (each rank's ZeRO optimizer partition,
each process's RNG state) and the rest on rank 0 alone. Each rank uploads the files it owns under
the step's folder, then a part record listing them (`parts/<attempt>/rank-<r>.json`). Rank 0
writes `MANIFEST.json` only once every rank's record of the same attempt is there, so a rank that
died mid-upload leaves a folder without a manifest, which no resume uses. The attempt id (rank 0's,
shared with the other ranks when they join) keeps records of an earlier set of pods out.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from finetune_trainer.checkpoints import layout
from finetune_trainer.checkpoints.errors import CheckpointRestoreError, CheckpointStoreError
from finetune_trainer.checkpoints.manifest import FileEntry, Manifest
from finetune_trainer.checkpoints.objects import Objects

log = logging.getLogger(__name__)
PARTS = "parts"
# How long rank 0 waits for the other ranks' parts once its own is stored (`parts_wait_seconds`).
WAIT_SECONDS = 240.0  # at most, after SIGTERM: within the default 300 s grace period
MIN_WAIT_SECONDS = 60.0  # the other ranks may start saving a little later than rank 0
WAIT_FACTOR = 3.0
POLL_SECONDS = 1.0
# DeepSpeed's per-rank files (`zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, ZeRO-3's
# `zero_pp_rank_<r>_mp_rank_00_model_states.pt`) and transformers' `rng_state_<r>.pth`.
_OWNED = re.compile(r"(?:^|/)(?:zero_pp_rank_(\d+)_[^/]*|rng_state_(\d+)\.pth)$")


class PartsMissingError(CheckpointStoreError):
    """Not every rank stored its part of a checkpoint in time: the checkpoint is not committed."""


class PartRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    rank: int
    world_size: int
    attempt: str
    step: int
    files: list[FileEntry]


def owner_rank(path: str) -> int | None:
    """The rank whose own state a checkpoint file holds; None for files every rank shares."""
    found = _OWNED.search(path)
    if found is None:
        return None
    return int(found.group(1) or found.group(2))


def belongs_to(rank: int) -> Callable[[str], bool]:
    """The files rank `rank` stores and restores: its own, and on rank 0 the shared ones too."""
    return lambda path: owner_rank(path) in (rank, None) if rank == 0 else owner_rank(path) == rank


def needed_by(rank: int) -> Callable[[str], bool]:
    """The files rank `rank` needs to resume: the shared ones and its own."""
    return lambda path: owner_rank(path) in (rank, None)


def check_world_size(manifest: Manifest, world_size: int, uri: str) -> None:
    """DeepSpeed cannot load ZeRO partitions saved by a different number of processes as they are."""
    if manifest.world_size == world_size:
        return
    raise CheckpointRestoreError(
        f"checkpoint {uri}: holds the training state of {manifest.world_size} process(es), but this job "
        f"runs {world_size} (resources.nodes x processes per pod), and ZeRO optimizer partitions do not "
        f"load into a different number of processes (fix: set resources.nodes so that the job runs "
        f"{manifest.world_size} process(es) again, or start a new job from its weights with model.source "
        "set to the checkpoint folder and no checkpoints.resumeFrom)"
    )


def part_key(step_key: str, attempt: str, rank: int) -> str:
    return layout.join(step_key, PARTS, attempt, f"rank-{rank}.json")


def upload_part(objects: Objects, local_dir: Path, step_key: str, record: PartRecord) -> None:
    """The rank's files first, its record last: a record means the files are stored."""
    for entry in record.files:
        objects.upload(local_dir / entry.path, f"{step_key}/{entry.path}")
    objects.put(part_key(step_key, record.attempt, record.rank), record.model_dump_json(indent=2).encode())
    log.info("rank %d stored its %d files of step %d", record.rank, len(record.files), record.step)


def parts_wait_seconds(own_upload_seconds: float, preempted: bool) -> float:
    """The wait for the other ranks' parts: they upload at the same time as rank 0 and are no
    larger than its part (which also holds the shared files), so a multiple of rank 0's own upload
    time, and at least MIN_WAIT_SECONDS; after SIGTERM no more than the grace period leaves."""
    wait = max(MIN_WAIT_SECONDS, WAIT_FACTOR * own_upload_seconds)
    return min(wait, WAIT_SECONDS) if preempted else wait


def wait_for_parts(
    objects: Objects,
    step_key: str,
    attempt: str,
    world_size: int,
    timeout: float = WAIT_SECONDS,
    poll: float = POLL_SECONDS,
) -> list[PartRecord]:
    """Every rank's record of this attempt, rank 0 first; PartsMissingError after `timeout`."""
    found: dict[int, PartRecord] = {}
    deadline = time.monotonic() + timeout
    while True:
        for rank in _missing(found, world_size):
            body = objects.get(part_key(step_key, attempt, rank))
            if body is not None:
                found[rank] = PartRecord.model_validate_json(body)
        missing = _missing(found, world_size)
        if not missing:
            return [found[r] for r in range(world_size)]
        if time.monotonic() >= deadline:
            raise PartsMissingError(_missing_message(step_key, missing, world_size, timeout))
        time.sleep(poll)


def _missing(found: dict[int, PartRecord], world_size: int) -> list[int]:
    return [r for r in range(world_size) if r not in found]


def _missing_message(step_key: str, missing: Iterable[int], world_size: int, timeout: float) -> str:
    ranks = ", ".join(str(r) for r in missing)
    return (
        f"checkpoint {step_key}: rank(s) {ranks} of {world_size} did not store their part within "
        f"{timeout:.0f}s, so it is not committed and no resume uses it (fix: see those ranks' trainer "
        "logs; a pod that was killed leaves its part missing, and the next retry resumes from the "
        "previous committed checkpoint)"
    )
