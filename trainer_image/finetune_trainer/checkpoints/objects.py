"""Object operations on one bucket: transfers with retries, listing, conditional puts, deletes."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from finetune_trainer.checkpoints.client import (
    TransferSettings,
    error_code,
    is_permanent,
    make_client,
    store_error,
)
from finetune_trainer.checkpoints.errors import CheckpointStoreError
from finetune_trainer.config import S3Store

log = logging.getLogger(__name__)
T = TypeVar("T")
_EXISTS = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
# What stores without conditional writes answer to If-None-Match.
_UNSUPPORTED = {"NotImplemented", "501", "InvalidArgument", "InvalidRequest", "400"}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_DELETE_BATCH = 1000


class ObjectExistsError(Exception):
    """A conditional put found the key present."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime | None


class Objects:
    def __init__(self, store: S3Store, transfer: TransferSettings, client: Any = None) -> None:
        self.store, self.transfer = store, transfer
        self.bucket = store.bucket
        self.client = client or make_client(store, transfer)
        self._transfer_config = transfer.transfer_config()
        self.conditional_puts = True

    def _retry(self, action: str, call: Callable[[], T]) -> T:
        from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        retryable = (BotoCoreError, ClientError, S3UploadFailedError, S3TransferFailedError, OSError)
        for attempt in range(1, self.transfer.file_attempts + 1):
            try:
                return call()
            except retryable as exc:
                if is_permanent(exc) or attempt == self.transfer.file_attempts:
                    raise store_error(exc, self.store, action) from None
                delay = min(30.0, 2.0**attempt) * (0.5 + random.random() / 2)  # noqa: S311 - jitter
                log.warning("%s failed (%s); retrying in %.1fs", action, error_code(exc) or exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def upload(self, path: Path, key: str) -> None:
        self._retry(
            f"uploading {key}",
            lambda: self.client.upload_file(str(path), self.bucket, key, Config=self._transfer_config),
        )

    def download(self, key: str, path: Path) -> bool:
        """False when the object does not exist."""
        from botocore.exceptions import ClientError

        path.parent.mkdir(parents=True, exist_ok=True)

        def call() -> bool:
            try:
                self.client.download_file(self.bucket, key, str(path), Config=self._transfer_config)
            except ClientError as exc:
                if error_code(exc) in _NOT_FOUND:
                    return False
                raise
            return True

        return self._retry(f"downloading {key}", call)

    def get(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        def call() -> bytes | None:
            try:
                body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError as exc:
                if error_code(exc) in _NOT_FOUND:
                    return None
                raise
            return body

        return self._retry(f"reading {key}", call)

    def put(self, key: str, body: bytes) -> None:
        self._retry(f"writing {key}", lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=body))

    def put_if_absent(self, key: str, body: bytes) -> None:
        """Create `key` unless it exists (raise ObjectExistsError): a conditional put where the store
        supports one, else a check then a put."""
        from botocore.exceptions import ClientError

        if self.conditional_puts:
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
                return
            except ClientError as exc:
                code = error_code(exc)
                if code in _EXISTS:
                    raise ObjectExistsError(key) from None
                if code not in _UNSUPPORTED:
                    raise store_error(exc, self.store, f"committing {key}") from None
                self.conditional_puts = False
                log.info("the store does not support conditional writes (%s): checking before writing", code)
        if self.get(key) is not None:
            raise ObjectExistsError(key)
        self.put(key, body)

    def listing(self, prefix: str) -> Iterator[ObjectInfo]:
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix.rstrip("/") + "/"):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"], int(obj.get("Size", 0)), obj.get("LastModified"))
        except (BotoCoreError, ClientError) as exc:
            raise store_error(exc, self.store, f"listing {prefix}") from None

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start : start + _DELETE_BATCH]]
            response = self._retry(
                "deleting old checkpoint objects",
                lambda b=batch: self.client.delete_objects(  # type: ignore[misc]
                    Bucket=self.bucket, Delete={"Objects": b, "Quiet": True}
                ),
            )
            errors = response.get("Errors", [])
            if errors:
                raise CheckpointStoreError(
                    f"checkpoints.store: deleting {errors[0].get('Key')} failed ({errors[0].get('Code')}) "
                    "(fix: allow s3:DeleteObject on the checkpoint prefix)"
                )
