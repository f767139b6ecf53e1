"""The boto3 client and transfer settings from `checkpoints.store`; credentials come only from the
environment (a Secret's env vars or mounted file) or the default chain, never from the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_trainer.checkpoints.errors import CheckpointStoreError, CheckpointStoreRefusedError
from finetune_trainer.config import S3Store

MiB = 1024 * 1024
# Codes that will not change on retry: report them with a fix instead of retrying.
_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}
_MISSING_BUCKET = {"NoSuchBucket"}


@dataclass(frozen=True)
class TransferSettings:
    chunk_bytes: int = 64 * MiB
    threshold_bytes: int = 64 * MiB
    concurrency: int = 8
    max_attempts: int = 8  # botocore's standard mode: exponential backoff with jitter
    file_attempts: int = 3  # whole-file retries on top, for transfers that fail midway

    def transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.threshold_bytes,
            multipart_chunksize=self.chunk_bytes,
            max_concurrency=self.concurrency,
            use_threads=True,
        )


def make_client(store: S3Store, transfer: TransferSettings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path" if store.path_style else "auto"},
        request_checksum_calculation=store.checksum_mode,
        response_checksum_validation=store.checksum_mode,
        retries={"max_attempts": transfer.max_attempts, "mode": "standard"},
        max_pool_connections=max(10, transfer.concurrency * 2),
    )
    session = boto3.session.Session()  # one per store: sessions are not thread-safe, clients are
    return session.client(
        "s3", endpoint_url=store.endpoint or None, region_name=store.region or None, config=config
    )


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    code = response.get("Error", {}).get("Code", "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(code or status or "")


def is_permanent(exc: BaseException) -> bool:
    return error_code(exc) in _ACCESS_CODES | _MISSING_BUCKET


def refusal(exc: BaseException, store: S3Store, bucket: str, action: str, field: str) -> str | None:
    """What a refusal no retry can change means, naming the store, the credentials Secret and the
    fix; None for any other error. `field` is the spec field that named the bucket."""
    code, endpoint = error_code(exc), store.endpoint or "AWS S3"
    if code in _MISSING_BUCKET:
        return f"{field}: bucket {bucket!r} does not exist at {endpoint} (fix: create it, or correct {field})"
    if code not in _ACCESS_CODES:
        return None
    secret = (
        f"Secret {store.credentials_secret!r} (checkpoints.store.credentialsSecret)"
        if store.credentials_secret
        else "checkpoints.store.credentialsSecret (none is set: the pod's default AWS credentials were used)"
    )
    meaning = {
        "InvalidAccessKeyId": "the access key id is unknown to the store",
        "SignatureDoesNotMatch": "the secret access key does not match the access key id",
        "InvalidToken": "the session token is invalid",
    }.get(code, "these credentials may not access it")
    return (
        f"{field}: {action} in bucket {bucket!r} at {endpoint} was refused ({code}: {meaning}) (fix: "
        f"correct the access key id and secret access key in {secret}, or the bucket's policy)"
    )


def store_error(exc: BaseException, store: S3Store, action: str) -> CheckpointStoreError:
    """A user-facing error for a failed request; the message never contains credentials."""
    code = error_code(exc)
    where = f"bucket {store.bucket!r} at {store.endpoint or 'AWS S3'}"
    field = "checkpoints.store.bucket" if code in _MISSING_BUCKET else "checkpoints.store"
    refused = refusal(exc, store, store.bucket, action, field)
    if refused is not None:
        return CheckpointStoreRefusedError(refused)
    detail = code or type(exc).__name__
    fix = "check checkpoints.store.endpoint, region and network access; set checksumMode when_required"
    return CheckpointStoreError(f"checkpoints.store: {action} in {where} failed ({detail}) (fix: {fix})")
