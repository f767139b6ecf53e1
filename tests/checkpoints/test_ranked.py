"""Checkpoints of a two-process job against a real S3 server: each rank stores its part, rank 0
commits the manifest only with every part, and each rank resumes from the same checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.checkpoints import CheckpointEvent, CheckpointRestoreError, RankedS3Sink, S3Sink
from finetune_trainer.checkpoints.parts import PartsMissingError, needed_by, owner_rank, parts_wait_seconds
from finetune_trainer.config import TrainerConfig

PREFIX = "jobs/team-a/support-bot/uid-1/checkpoints"
SHARED = ("model.safetensors", "trainer_state.json", "latest", "global_step{n}/mp_rank_00_model_states.pt")


def rank_files(rank: int, step: int) -> dict[str, bytes]:
    """What DeepSpeed and transformers write on each rank's own disk (rank 0 also the shared files)."""
    own = {
        f"global_step{step}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt": os.urandom(1500),
        f"rng_state_{rank}.pth": os.urandom(64),
    }
    if rank:
        return own
    shared = {name.format(n=step): os.urandom(512) for name in SHARED}
    shared["trainer_state.json"] = json.dumps({"global_step": step, "log_history": []}).encode()
    return shared | own


def save_on_ranks(
    sinks: list[RankedS3Sink], checkpoint_folder: Any, root: Path, step: int, ranks: tuple[int, ...] = (0, 1)
) -> list[Path]:
    folders = []
    for rank in ranks:
        folder = checkpoint_folder(root / f"rank{rank}" / f"checkpoint-{step}", step, rank_files(rank, step))
        sinks[rank].save(folder, step, {"loss": 1.0})
        folders.append(folder)
    return folders


def joined_sinks(config: TrainerConfig, make_store: Any, **kw: Any) -> list[RankedS3Sink]:
    """Two ranks after joining: rank 1 got rank 0's upload attempt through the agreement."""
    sinks = [RankedS3Sink(make_store(config), config, rank, 2, **kw) for rank in (0, 1)]
    assert sinks[1].restore_agreed(Path("/nonexistent"), sinks[0].agreement()) is None
    return sinks


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("path", "owner"),
    [
        ("global_step30/zero_pp_rank_1_mp_rank_00_optim_states.pt", 1),
        ("global_step30/zero_pp_rank_12_mp_rank_00_model_states.pt", 12),  # ZeRO-3's weight partitions
        ("rng_state_3.pth", 3),
        ("rng_state.pth", None),  # one process
        ("global_step30/mp_rank_00_model_states.pt", None),
        ("model.safetensors", None),
        ("latest", None),
    ],
)
def test_per_rank_files_belong_to_their_rank_and_the_rest_is_shared(path: str, owner: int | None) -> None:
    assert owner_rank(path) == owner
    rank = owner or 0
    assert needed_by(rank)(path)
    assert needed_by(rank + 1)(path) == (owner is None), "shared files go to every rank, own ones not"


@pytest.mark.parametrize(
    ("own_upload_seconds", "preempted", "wait"),
    [
        (2.0, False, 60.0),  # small checkpoints: the other ranks may simply start later
        (100.0, False, 300.0),  # a 7B model's shards: three times rank 0's own upload
        (900.0, False, 2700.0),  # no fixed cap while training: the wait follows the work
        (100.0, True, 240.0),  # after SIGTERM, within the grace period
        (2.0, True, 60.0),
    ],
)
def test_the_wait_for_other_ranks_parts_scales_with_the_upload(
    own_upload_seconds: float, preempted: bool, wait: float
) -> None:
    assert parts_wait_seconds(own_upload_seconds, preempted) == wait


def test_both_parts_commit_one_manifest_and_each_rank_restores_its_share(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, tmp_path: Path
) -> None:
    sinks = joined_sinks(config, make_store)
    rank0, rank1 = save_on_ranks(sinks, checkpoint_folder, tmp_path / "run1", 10)
    for sink in reversed(sinks):
        sink.close()

    store = make_store(config)
    [checkpoint] = store.checkpoints()
    assert checkpoint.committed and checkpoint.step == 10
    manifest = store.read_manifest(checkpoint)
    assert manifest.world_size == 2
    listed = {f.path for f in manifest.files}
    assert set(files_under(rank1)) <= listed and set(files_under(rank0)) <= listed
    assert "global_step10/zero_pp_rank_1_mp_rank_00_optim_states.pt" in listed
    assert not (tmp_path / "run1" / "rank1" / ".upload" / "checkpoint-10").exists(), "removed after commit"

    # A retried job: rank 0 chooses, rank 1 restores the same checkpoint (shared files + its own).
    again = [RankedS3Sink(make_store(config), config, rank, 2) for rank in (0, 1)]
    assert again[1].restore(tmp_path / "run2" / "rank1") is None, "rank 1 waits for rank 0's choice"
    restored0 = again[0].restore(tmp_path / "run2" / "rank0")
    restored1 = again[1].restore_agreed(tmp_path / "run2" / "rank1", again[0].agreement())
    assert restored0 is not None and restored1 is not None
    assert restored0.name == restored1.name == "checkpoint-10"
    got0, got1 = files_under(restored0), files_under(restored1)
    assert {k: v for k, v in got0.items() if k != "MANIFEST.json"} == files_under(rank0) | {
        "training_config.json": got0["training_config.json"]
    }
    assert (
        got1["global_step10/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
        == (files_under(rank1)["global_step10/zero_pp_rank_1_mp_rank_00_optim_states.pt"])
    )
    assert got1["model.safetensors"] == got0["model.safetensors"]
    assert not any("rank_0_" in name or "rng_state_0" in name for name in got1), "not rank 0's own state"
    assert not any("rank_1_" in name or "rng_state_1" in name for name in got0)


def test_missing_part_leaves_the_checkpoint_uncommitted_and_resume_falls_back(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, tmp_path: Path, s3: Any
) -> None:
    events: list[CheckpointEvent] = []
    sinks = joined_sinks(config, make_store, on_event=events.append)
    sinks[0].parts_timeout = 2
    save_on_ranks(sinks, checkpoint_folder, tmp_path / "run1", 10)
    sinks[1].close()
    sinks[0].wait()

    # Step 20: rank 1 dies after storing its optimizer shard but before its part record; a record
    # of an earlier set of pods (another attempt) does not count either.
    bucket, step20 = config.checkpoints.store.bucket, f"{PREFIX}/step-20"
    shard = "global_step20/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    s3.put_object(Bucket=bucket, Key=f"{step20}/{shard}", Body=b"x")
    s3.put_object(Bucket=bucket, Key=f"{step20}/parts/an-old-attempt/rank-1.json", Body=b"{}")
    save_on_ranks(sinks, checkpoint_folder, tmp_path / "run1", 20, ranks=(0,))
    with pytest.raises(PartsMissingError) as caught:
        sinks[0].close()  # as on SIGTERM: the last checkpoint must commit, and it cannot

    message = str(caught.value)
    assert "step-20: rank(s) 1 of 2 did not store their part" in message and "fix:" in message
    # In the background, then once more at close: neither time does the manifest get written.
    assert [(e.kind, e.step) for e in events] == [("committed", 10)] + [("upload_failed", 20)] * 2
    store = make_store(config)
    assert [(c.step, c.committed) for c in store.checkpoints()] == [(10, True), (20, False)]

    skipped: list[CheckpointEvent] = []
    resumed = RankedS3Sink(make_store(config), config, 0, 2, on_event=skipped.append)
    restored = resumed.restore(tmp_path / "run2")
    assert restored is not None and restored.name == "checkpoint-10"
    assert [(e.kind, e.step) for e in skipped] == [("skipped", 20)]
    assert "MANIFEST.json" in skipped[0].reason


def test_a_checkpoint_of_two_processes_does_not_resume_a_single_process_job(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, tmp_path: Path
) -> None:
    sinks = joined_sinks(config, make_store)
    save_on_ranks(sinks, checkpoint_folder, tmp_path / "run1", 10)
    for sink in reversed(sinks):
        sink.close()

    with pytest.raises(CheckpointRestoreError) as caught:
        S3Sink(make_store(config), config).restore(tmp_path / "run2")
    message = str(caught.value)
    assert "holds the training state of 2 process(es), but this job runs 1" in message
    assert "fix: set resources.nodes" in message
