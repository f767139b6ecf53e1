"""S3Sink: background uploads, bounded local copies, drain at exit, restore with skipped reasons."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

from finetune_trainer.checkpoints import CheckpointEvent, S3Sink
from finetune_trainer.config import TrainerConfig

PREFIX = "jobs/team-a/support-bot/uid-1/checkpoints"


def _hook(store: Any, handler: Any) -> None:
    store.objects.client.meta.events.register("before-parameter-build.s3.PutObject", handler)


def test_background_uploads_drain_and_remove_local_copies_only_after_commit(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, tmp_path: Path
) -> None:
    store = make_store(config)
    work = tmp_path / "checkpoints"
    staging = work / ".upload"
    started, release = threading.Event(), threading.Event()
    staged_at_commit: list[tuple[str, bool]] = []

    def observe(params: Any, **kwargs: Any) -> None:
        key = params["Key"]
        if key.endswith("step-1/model.safetensors"):
            started.set()
            release.wait(timeout=30)  # a slow network while training goes on
        if key.endswith("/MANIFEST.json"):
            name = key.split("/")[-2].replace("step-", "checkpoint-")
            staged_at_commit.append((name, (staging / name).is_dir()))

    _hook(store, observe)
    events: list[CheckpointEvent] = []
    sink = S3Sink(store, config, on_event=events.append)

    for step in (1, 2, 3):
        folder = checkpoint_folder(work / f"checkpoint-{step}", step)
        info = sink.save(folder, step, {"loss": 1.0 / step})
        assert info is not None and info.uri == f"s3://{config.checkpoints.store.bucket}/{PREFIX}/step-{step}"
        shutil.rmtree(folder)  # training rotates its own copy away; the staged copy must survive
        if step == 1:
            assert started.wait(timeout=30)

    assert (staging / "checkpoint-1").is_dir(), "uploading: the local copy stays"
    assert not (staging / "checkpoint-2").exists(), "replaced by a newer checkpoint while waiting"
    assert (staging / "checkpoint-3").is_dir(), "waiting: the local copy stays"
    release.set()
    sink.close()

    assert [c.step for c in store.checkpoints() if c.committed] == [1, 3]
    assert staged_at_commit == [("checkpoint-1", True), ("checkpoint-3", True)]
    assert not any(staging.iterdir()), "committed checkpoints leave no local copy"
    assert [(e.kind, e.step) for e in events] == [("committed", 1), ("committed", 3)]
    manifests = [store.read_manifest(c) for c in store.checkpoints() if c.committed]
    assert [e.info.time for e in events] == [m.created for m in manifests], "status.checkpoint.time"


def test_failed_upload_keeps_local_copy_and_close_retries_it(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, tmp_path: Path
) -> None:
    from botocore.exceptions import EndpointConnectionError

    store = make_store(config)
    failures = {"left": 2}  # both attempts of the first upload fail: the network is down

    def flaky(params: Any, **kwargs: Any) -> None:
        if params["Key"].endswith("step-7/optimizer.pt") and failures["left"]:
            failures["left"] -= 1
            raise EndpointConnectionError(endpoint_url=config.checkpoints.store.endpoint)

    _hook(store, flaky)
    events: list[CheckpointEvent] = []
    sink = S3Sink(store, config, on_event=events.append)
    folder = checkpoint_folder(tmp_path / "checkpoints" / "checkpoint-7", 7)

    sink.save(folder, 7, {})
    sink.wait()
    assert [e.kind for e in events] == ["upload_failed"]
    assert "uploading" in events[0].reason and events[0].step == 7
    assert (tmp_path / "checkpoints" / ".upload" / "checkpoint-7").is_dir()
    sink.close()  # e.g. on SIGTERM: the checkpoint must be committed before exit 75

    assert [(c.step, c.committed) for c in store.checkpoints()] == [(7, True)]
    assert [e.kind for e in events] == ["upload_failed", "committed"]


def test_restore_downloads_latest_verified_and_reports_skipped(
    new_config: Any, make_store: Any, checkpoint_folder: Any, s3: Any, tmp_path: Path
) -> None:
    config = new_config(keep=5, verifyRestore=True)
    store = make_store(config)  # no restore check: verification checks every file's sha256
    sink = S3Sink(store, config)
    originals = {}
    for step in (2, 4):
        originals[step] = checkpoint_folder(tmp_path / "run1" / f"checkpoint-{step}", step)
        info = sink.save(originals[step], step, {})
        assert info is not None and info.verified == (step == 2), "only the first one is verified in line"
    sink.close()
    bucket = config.checkpoints.store.bucket
    s3.delete_object(Bucket=bucket, Key=f"{PREFIX}/step-4/scheduler.pt")  # lost after verification
    events: list[CheckpointEvent] = []

    restored = S3Sink(make_store(config), config, on_event=events.append).restore(tmp_path / "run2")

    assert restored == tmp_path / "run2" / "checkpoint-2"
    for path in originals[2].rglob("*"):
        if path.is_file():
            assert (restored / path.relative_to(originals[2])).read_bytes() == path.read_bytes()
    assert (restored / "training_config.json").is_file(), "the config travels with every checkpoint"
    assert [(e.kind, e.step) for e in events] == [("skipped", 4)]
    assert "scheduler.pt" in events[0].reason
    assert not (tmp_path / "run2" / ".restoring").exists()


def test_final_artifact_is_committed_with_its_manifest(
    new_config: Any, make_store: Any, checkpoint_folder: Any, s3: Any, tmp_path: Path
) -> None:
    config = new_config(verifyRestore=True)
    store = make_store(config)
    sink = S3Sink(store, config)
    sink.save(checkpoint_folder(tmp_path / "checkpoints" / "checkpoint-8", 8), 8, {})
    final = checkpoint_folder(
        tmp_path / "final",
        8,
        {
            "adapter_model.safetensors": b"weights",
            "README.md": b"# model card",
            "metrics.json": b'{"baseline": {"eval_loss": 2.5}, "final": {"eval_loss": 1.25}}',
        },
    )

    info = sink.save_final(final)
    sink.close()

    bucket = config.checkpoints.store.bucket
    assert info is not None and info.uri == f"s3://{bucket}/{PREFIX}/final" and info.verified
    manifest = store.read_manifest(store.final())
    assert info.time == manifest.created
    assert manifest.kind == "final" and manifest.step == 8 and manifest.metrics == {"eval_loss": 1.25}
    paths = {f.path for f in manifest.files}
    assert {"adapter_model.safetensors", "README.md", "training_config.json"} <= paths
    assert s3.head_object(Bucket=bucket, Key=f"{PREFIX}/final/VERIFIED")


def test_trainer_seam_builds_the_s3_sink(config: TrainerConfig) -> None:
    from finetune_trainer.reporting import ProgressReporter
    from finetune_trainer.sink import build_sink

    reporter = ProgressReporter(config)
    sink = build_sink(config, reporter, base_model_path="/models/base")
    assert isinstance(sink, S3Sink)
    sink._emit(CheckpointEvent("skipped", "s3://b/step-3", 3, "no MANIFEST.json"))
    assert "checkpoint s3://b/step-3 skipped: no MANIFEST.json" in reporter.report.message


def test_secret_key_never_in_logs_or_checkpoint_objects(
    new_config: Any,
    make_store: Any,
    checkpoint_folder: Any,
    s3_env: Any,
    s3: Any,
    caplog: Any,
    tmp_path: Path,
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)  # botocore logs requests and credential lookups at DEBUG
    config = new_config(keep=1, verifyRestore=True)
    sink = S3Sink(make_store(config), config)
    for step in (1, 2):
        sink.save(checkpoint_folder(tmp_path / "checkpoints" / f"checkpoint-{step}", step), step, {})
    sink.close()
    S3Sink(make_store(config), config).restore(tmp_path / "again")

    assert "botocore" in caplog.text and s3_env.secret_key not in caplog.text
    bucket = config.checkpoints.store.bucket
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith("MANIFEST.json") for k in stored) and any(
        k.endswith("training_config.json") for k in stored
    )
    for key in stored:
        assert s3_env.secret_key.encode() not in s3.get_object(Bucket=bucket, Key=key)["Body"].read(), key
