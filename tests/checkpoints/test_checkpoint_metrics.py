"""What /metrics says about checkpoints stored in a real S3-compatible server: upload time and bytes,
and the step and time of the last committed and last verified checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from finetune_trainer.checkpoints import S3Sink
from finetune_trainer.checkpoints.layout import MANIFEST, MARKERS
from finetune_trainer.config import TrainerConfig
from finetune_trainer.reporting import ProgressReporter, TrainerMetrics
from finetune_trainer.sink import report_checkpoint_events

LABELS = {"namespace": "team-a", "job": "support-bot"}


def stored_bytes(s3: Any, bucket: str, uri: str) -> int:
    """Size of a checkpoint's files in the store (its manifest and markers not counted)."""
    prefix = uri.removeprefix(f"s3://{bucket}/") + "/"
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    return sum(o["Size"] for o in listing if o["Key"].rsplit("/", 1)[1] not in {MANIFEST, *MARKERS})


def test_uploads_commits_and_verifications_reach_the_metrics(
    new_config: Any, make_store: Any, checkpoint_folder: Any, s3: Any, tmp_path: Path
) -> None:
    config: TrainerConfig = new_config(keep=3, verifyRestore=True)
    metrics = TrainerMetrics(config.job.namespace, config.job.name)
    reporter = ProgressReporter(config, writes=False)
    sink = S3Sink(make_store(config), config, on_event=report_checkpoint_events(reporter, metrics))
    value = metrics.registry.get_sample_value

    before = time.time()
    uris = []
    for step in (5, 10):
        folder = checkpoint_folder(tmp_path / "checkpoints" / f"checkpoint-{step}", step)
        info = sink.save(folder, step, {"loss": 1.0})
        assert info is not None
        uris.append(info.uri)
    sink.close()
    after = time.time()

    assert value("finetune_checkpoint_last_committed_step", LABELS) == 10
    assert value("finetune_checkpoint_last_verified_step", LABELS) == 10
    for kind in ("committed", "verified"):
        stamp = value(f"finetune_checkpoint_last_{kind}_timestamp_seconds", LABELS)
        assert stamp is not None and before <= stamp <= after, kind
    bucket = config.checkpoints.store.bucket
    expected = sum(stored_bytes(s3, bucket, uri) for uri in uris)
    assert expected > 3000
    assert value("finetune_checkpoint_uploaded_bytes_total", LABELS) == expected
    assert value("finetune_checkpoint_upload_duration_seconds_count", LABELS) == 2
    seconds = value("finetune_checkpoint_upload_duration_seconds_sum", LABELS)
    assert seconds is not None and 0 < seconds <= after - before


def test_a_failed_upload_is_not_counted(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, tmp_path: Path
) -> None:
    from botocore.exceptions import EndpointConnectionError

    store = make_store(config)

    def down(params: Any, **kwargs: Any) -> None:
        raise EndpointConnectionError(endpoint_url=config.checkpoints.store.endpoint)

    store.objects.client.meta.events.register("before-parameter-build.s3.PutObject", down)
    metrics = TrainerMetrics(config.job.namespace, config.job.name)
    sink = S3Sink(
        store, config, on_event=report_checkpoint_events(ProgressReporter(config, writes=False), metrics)
    )
    sink.save(checkpoint_folder(tmp_path / "checkpoints" / "checkpoint-3", 3), 3, {})
    sink.uploader.close()  # drained: the upload failed on every attempt

    value = metrics.registry.get_sample_value
    assert value("finetune_checkpoint_last_committed_step", LABELS) is None
    assert value("finetune_checkpoint_uploaded_bytes_total", LABELS) == 0
    assert value("finetune_checkpoint_upload_duration_seconds_count", LABELS) == 0
