"""CheckpointStore against a real S3-compatible server: layout, manifest last, verification,
conditional puts, retention, resolve, credentials."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.checkpoints import CheckpointConflictError, CheckpointStore
from finetune_trainer.checkpoints.describe import build_manifest
from finetune_trainer.checkpoints.errors import CheckpointStoreRefusedError
from finetune_trainer.checkpoints.objects import ObjectExistsError
from finetune_trainer.config import S3Store, TrainerConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.sources import download_s3
from finetune_trainer.sink import StoreRefusedError

MiB = 1024 * 1024
PREFIX = "jobs/team-a/support-bot/uid-1/checkpoints"


def commit(store: CheckpointStore, config: TrainerConfig, folder: Path, step: int, **metrics: float) -> Any:
    return store.commit(folder, build_manifest(folder, config, step, metrics, None))


def keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_layout_and_multipart_upload_round_trip(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, s3: Any, bucket: str, tmp_path: Path
) -> None:
    big = os.urandom(6 * MiB + 123)  # above the 5 MiB chunk size: two parts
    folder = checkpoint_folder(
        tmp_path / "checkpoint-10", 10, {"model.safetensors": big, "sub/x.json": b"{}"}
    )
    store = make_store(config)

    checkpoint = commit(store, config, folder, 10)

    assert checkpoint.uri == f"s3://{bucket}/{PREFIX}/step-10"
    assert keys(s3, bucket) == [
        f"{PREFIX}/step-10/MANIFEST.json",
        f"{PREFIX}/step-10/model.safetensors",
        f"{PREFIX}/step-10/sub/x.json",
    ]
    etag = s3.head_object(Bucket=bucket, Key=f"{PREFIX}/step-10/model.safetensors")["ETag"]
    assert etag.strip('"').endswith("-2"), f"expected a 2-part multipart upload, ETag {etag}"
    manifest = store.download(checkpoint, tmp_path / "restored")
    assert (tmp_path / "restored" / "model.safetensors").read_bytes() == big
    assert {f.path: f.size for f in manifest.files} == {"model.safetensors": len(big), "sub/x.json": 2}
    assert manifest.step == 10 and manifest.job.uid == "uid-1"
    assert manifest.seeds == {"training": 42, "dataSplit": 42} and manifest.config_sha256
    assert manifest.versions["torch"] and manifest.epoch is None


def test_manifest_is_written_after_every_file(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, tmp_path: Path
) -> None:
    store = make_store(config)
    written: list[str] = []
    record = lambda params, **kw: written.append(params["Key"].rsplit("/", 1)[-1])  # noqa: E731
    store.objects.client.meta.events.register("before-parameter-build.s3.PutObject", record)
    store.objects.client.meta.events.register("before-parameter-build.s3.CreateMultipartUpload", record)

    commit(store, config, checkpoint_folder(tmp_path / "checkpoint-1", 1), 1)

    assert written[-1] == "MANIFEST.json" and written.count("MANIFEST.json") == 1
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(written[:-1])


def test_folder_without_manifest_is_not_a_checkpoint(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, tmp_path: Path
) -> None:
    store = make_store(config)
    commit(store, config, checkpoint_folder(tmp_path / "checkpoint-1", 1), 1)
    assert store.verify(store.checkpoints()[0]).ok
    interrupted = checkpoint_folder(tmp_path / "checkpoint-2", 2)
    store.objects.upload(interrupted / "model.safetensors", f"{PREFIX}/step-2/model.safetensors")

    selection = store.latest_verified()

    assert selection.checkpoint is not None and selection.checkpoint.step == 1
    assert [(s.step, s.reason) for s in selection.skipped] == [
        (2, "no MANIFEST.json: its upload did not finish")
    ]


def test_corrupted_file_fails_verification_and_resume_falls_back(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, s3: Any, bucket: str, tmp_path: Path
) -> None:
    store = make_store(config)
    first = commit(store, config, checkpoint_folder(tmp_path / "checkpoint-1", 1), 1)
    assert store.verify(first).ok
    second = commit(store, config, checkpoint_folder(tmp_path / "checkpoint-2", 2), 2)
    key = f"{PREFIX}/step-2/optimizer.pt"
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[100] ^= 0xFF  # one flipped byte, same size
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    result = store.verify(second)
    selection = make_store(config).latest_verified()  # a fresh process looking for where to resume

    assert not result.ok and result.reason.startswith("corrupt: optimizer.pt: sha256")
    assert f"{PREFIX}/step-2/INVALID" in keys(s3, bucket)
    assert selection.checkpoint is not None and selection.checkpoint.step == 1
    assert len(selection.skipped) == 1
    assert selection.skipped[0].uri == second.uri
    assert "marked invalid: corrupt: optimizer.pt: sha256" in selection.skipped[0].reason


def test_unverified_newest_checkpoint_is_verified_when_resuming(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """The checkpoint saved on SIGTERM has no VERIFIED marker yet: resume verifies and uses it."""
    store = make_store(config)
    assert store.verify(commit(store, config, checkpoint_folder(tmp_path / "c1", 1), 1)).ok
    commit(store, config, checkpoint_folder(tmp_path / "c2", 2), 2)

    selection = make_store(config).latest_verified()

    assert selection.checkpoint is not None and selection.checkpoint.step == 2 and not selection.skipped
    assert f"{PREFIX}/step-2/VERIFIED" in keys(s3, bucket)
    marker = json.loads(s3.get_object(Bucket=bucket, Key=f"{PREFIX}/step-2/VERIFIED")["Body"].read())
    assert len(marker["manifestSha256"]) == 64


def test_conditional_put_refuses_to_overwrite_a_committed_checkpoint(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, s3: Any, bucket: str, tmp_path: Path
) -> None:
    store = make_store(config)
    folder = checkpoint_folder(tmp_path / "checkpoint-5", 5)
    commit(store, config, folder, 5)
    manifest_key = f"{PREFIX}/step-5/MANIFEST.json"
    before = s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()

    commit(store, config, folder, 5)  # a retry with the same files is a no-op
    with pytest.raises(ObjectExistsError):
        store.objects.put_if_absent(manifest_key, b"{}")
    other = checkpoint_folder(tmp_path / "other-5", 5)  # different random bytes
    with pytest.raises(CheckpointConflictError, match=r"step-5 is already committed with different files"):
        commit(make_store(config), config, other, 5)

    assert s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read() == before
    assert store.objects.conditional_puts


def _refuse_conditional_puts(request: Any, **kwargs: Any) -> Any:
    """Answer like a store without conditional writes: 501 NotImplemented for If-None-Match."""
    from botocore.awsrequest import AWSResponse

    if "If-None-Match" not in request.headers:
        return None
    body = b"<Error><Code>NotImplemented</Code><Message>not implemented</Message></Error>"

    class Raw:
        def stream(self, **kw: Any) -> Any:
            yield body

    return AWSResponse(request.url, 501, {"Content-Type": "application/xml"}, Raw())


def test_stores_without_conditional_puts_fall_back_to_check_then_put(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, s3: Any, bucket: str, tmp_path: Path
) -> None:
    store = make_store(config)
    store.objects.client.meta.events.register("before-send.s3.PutObject", _refuse_conditional_puts)

    checkpoint = commit(store, config, checkpoint_folder(tmp_path / "checkpoint-1", 1), 1)

    assert not store.objects.conditional_puts
    assert store.verify(checkpoint).ok
    with pytest.raises(CheckpointConflictError):
        commit(store, config, checkpoint_folder(tmp_path / "other-1", 1), 1)
    with pytest.raises(ObjectExistsError):
        store.objects.put_if_absent(f"{PREFIX}/step-1/MANIFEST.json", b"{}")


def test_retention_keeps_newest_latest_verified_and_best(
    new_config: Any, make_store: Any, checkpoint_folder: Any, s3: Any, bucket: str, tmp_path: Path
) -> None:
    config = new_config(keep=2)
    store = make_store(config)
    losses = {1: 2.0, 2: 0.5, 3: 1.5, 4: 1.2, 5: 1.1}  # step 2 is the best by eval_loss
    for step, loss in losses.items():
        checkpoint = commit(
            store, config, checkpoint_folder(tmp_path / f"c{step}", step), step, eval_loss=loss
        )
        if step == 1:
            assert store.verify(checkpoint).ok  # the only verified one
    store.objects.upload(tmp_path / "c1" / "rng_state.pth", f"{PREFIX}/step-0/rng_state.pth")  # interrupted
    store.objects.upload(tmp_path / "c1" / "rng_state.pth", f"{PREFIX}/step-6/rng_state.pth")  # uploading

    deleted = store.apply_retention(config.checkpoints.keep)

    assert sorted(c.step for c in deleted if c.committed) == [3]
    assert [c.step for c in store.checkpoints() if c.committed] == [1, 2, 4, 5]
    assert not keys(s3, bucket, f"{PREFIX}/step-3/")
    assert not keys(s3, bucket, f"{PREFIX}/step-0/"), "leftovers of interrupted uploads are removed"
    assert keys(s3, bucket, f"{PREFIX}/step-6/"), "a folder newer than every commit may still be uploading"


@pytest.mark.parametrize(
    ("steps", "keep", "verified", "invalid", "metrics", "greater", "deleted"),
    [
        ([1, 2, 3, 4], 2, {4}, set(), {}, False, [1, 2]),
        ([1, 2, 3, 4], 2, {1}, set(), {}, False, [2]),
        ([1, 2, 3, 4], 1, set(), set(), {2: 0.1, 3: 0.9}, False, [1, 3]),
        ([1, 2, 3, 4], 1, set(), set(), {2: 0.1, 3: 0.9}, True, [1, 2]),
        ([1, 2, 3, 4], 2, {2}, {4}, {}, False, [1, 4]),
        ([1, 2], 5, set(), set(), {}, False, []),
    ],
)
def test_retention_policy(
    steps: list[int],
    keep: int,
    verified: set[int],
    invalid: set[int],
    metrics: dict[int, float],
    greater: bool,
    deleted: list[int],
) -> None:
    from finetune_trainer.checkpoints.retention import Candidate, steps_to_delete

    candidates = [Candidate(s, s in verified, s in invalid, metrics.get(s)) for s in steps]
    assert steps_to_delete(candidates, keep, greater) == deleted


def test_resolve_latest_across_runs_and_explicit_uri(
    config: TrainerConfig, make_store: Any, checkpoint_folder: Any, bucket: str, tmp_path: Path
) -> None:
    old_run = make_store(config.model_copy(update={"job": config.job.model_copy(update={"uid": "uid-0"})}))
    assert old_run.verify(commit(old_run, config, checkpoint_folder(tmp_path / "o7", 7), 7)).ok
    store = make_store(config)  # a new FineTuneJob with the same name: no checkpoints of its own

    latest = store.resolve("latest")
    explicit = store.resolve(f"s3://{bucket}/jobs/team-a/support-bot/uid-0/checkpoints/step-7/")
    missing = store.resolve(f"s3://{bucket}/jobs/team-a/support-bot/uid-0/checkpoints/step-9")

    assert latest.checkpoint is not None and latest.checkpoint.key.endswith("uid-0/checkpoints/step-7")
    assert explicit.checkpoint == latest.checkpoint
    assert missing.checkpoint is None and "no MANIFEST.json" in missing.skipped[0].reason
    with pytest.raises(ValueError, match=r"checkpoints.resumeFrom: got 'step-7': not an s3://"):
        store.resolve("step-7")


def test_wrong_credentials_and_missing_bucket_give_clear_errors(
    config: TrainerConfig,
    make_store: Any,
    checkpoint_folder: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    folder = checkpoint_folder(tmp_path / "checkpoint-1", 1)
    no_bucket = config.model_copy(
        update={
            "checkpoints": config.checkpoints.model_copy(
                update={"store": config.checkpoints.store.model_copy(update={"bucket": "no-such-bucket"})}
            )
        }
    )
    with pytest.raises(
        CheckpointStoreRefusedError,
        match=r"checkpoints.store.bucket: bucket 'no-such-bucket' does not exist at http",
    ):
        commit(make_store(no_bucket), no_bucket, folder, 1)

    wrong_secret = "wrong-" + os.environ["AWS_SECRET_ACCESS_KEY"][::-1]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    with pytest.raises(
        CheckpointStoreRefusedError,
        match=r"was refused \(SignatureDoesNotMatch: the secret access key does not match the access key "
        r"id\) \(fix: correct the access key id and secret access key in checkpoints.store.credentialsSecret",
    ) as err:
        commit(make_store(config), config, folder, 1)
    assert wrong_secret not in str(err.value)


def test_sources_in_a_store_that_refuses_name_the_field_the_secret_and_the_fix(
    s3_env: Any, bucket: str, s3: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    s3.put_object(Bucket=bucket, Key="data/train.jsonl", Body=b'{"text": "hello"}\n')
    store = S3Store(endpoint=s3_env.endpoint, bucket=bucket, path_style=True, credentials_secret="s3-creds")
    assert download_s3(f"s3://{bucket}/data/train.jsonl", store, tmp_path / "ok").is_file()  # premise

    with pytest.raises(DataError, match=r"model.source: 's3://.*/models/none/': no objects found"):
        download_s3(f"s3://{bucket}/models/none/", store, tmp_path / "m", field="model.source")
    with pytest.raises(StoreRefusedError, match=r"dataset.source: bucket 'no-such-bucket' does not exist"):
        download_s3("s3://no-such-bucket/train.jsonl", store, tmp_path / "b")

    wrong_secret = "wrong-" + s3_env.secret_key[::-1]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    with pytest.raises(StoreRefusedError) as err:
        download_s3(f"s3://{bucket}/data/train.jsonl", store, tmp_path / "wrong")
    message = str(err.value)
    where = f"reading s3://{bucket}/data/train.jsonl in bucket {bucket!r} at {s3_env.endpoint}"
    assert message.startswith(f"dataset.source: {where} was refused")
    assert "SignatureDoesNotMatch" in message and "Secret 's3-creds'" in message
    assert wrong_secret not in message
