"""A real S3-compatible server (versitygw) for the checkpoint tests, a bucket per test, and configs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.checkpoints import CheckpointStore, TransferSettings
from finetune_trainer.config import TrainerConfig
from localcluster.s3 import S3Server

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Credentials the way the operator passes them: environment variables from a Secret."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server


def raw_client(server: S3Server) -> Any:
    """A plain client for test setup and for looking at what the store wrote."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"),
    )


@pytest.fixture
def s3(s3_env: S3Server) -> Any:
    return raw_client(s3_env)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=name)
    return name


def make_config(endpoint: str, bucket: str, tmp_path: Path, **checkpoints: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": {"namespace": "team-a", "name": "support-bot", "uid": "uid-1"},
            "model": {"source": str(tmp_path / "base")},
            "dataset": {"source": str(tmp_path / "data.jsonl")},
            "method": {"type": "full", "allowSmallDataFullFineTune": True},
            "checkpoints": {
                "store": {
                    "endpoint": endpoint,
                    "region": "us-east-1",
                    "bucket": bucket,
                    "prefix": "jobs",
                    "pathStyle": True,
                    "checksumMode": "when_required",
                },
                **checkpoints,
            },
            "outputDir": str(tmp_path / "out"),
        }
    )


@pytest.fixture
def config(s3_env: S3Server, bucket: str, tmp_path: Path) -> TrainerConfig:
    return make_config(s3_env.endpoint, bucket, tmp_path, keep=3, verifyRestore=False)


SMALL_TRANSFER = TransferSettings(
    chunk_bytes=5 * MiB, threshold_bytes=5 * MiB, concurrency=4, file_attempts=2
)


def _make_store(config: TrainerConfig, **kwargs: Any) -> CheckpointStore:
    kwargs.setdefault("transfer", SMALL_TRANSFER)
    return CheckpointStore(config.checkpoints.store, config.job, **kwargs)


@pytest.fixture
def make_store() -> Any:
    """make_store(config, **CheckpointStore kwargs): a store with a 5 MiB multipart chunk size."""
    return _make_store


@pytest.fixture
def checkpoint_folder() -> Any:
    """checkpoint_folder(path, step, files=None): a folder shaped like a transformers checkpoint."""
    return _write_checkpoint


@pytest.fixture
def new_config(s3_env: S3Server, bucket: str, tmp_path: Path) -> Any:
    """new_config(**checkpoints fields): a TrainerConfig pointing at this test's bucket."""
    return lambda **fields: make_config(s3_env.endpoint, bucket, tmp_path, **fields)


def _write_checkpoint(folder: Path, step: int, files: dict[str, bytes] | None = None) -> Path:
    """A checkpoint-N folder shaped like transformers writes one (small files)."""
    folder.mkdir(parents=True, exist_ok=True)
    contents = files or {
        "model.safetensors": os.urandom(2048),
        "optimizer.pt": os.urandom(1024),
        "scheduler.pt": b"scheduler",
        "rng_state.pth": b"rng",
        "trainer_state.json": b'{"global_step": %d, "epoch": 0.5, "log_history": []}' % step,
        "global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"zero shard",
    }
    for name, body in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(body)
    return folder
