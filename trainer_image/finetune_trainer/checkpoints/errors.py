"""Errors of the checkpoint store; each message names the setting, the value and the fix."""

from __future__ import annotations

from finetune_trainer.sink import CheckpointRestoreError, CheckpointStoreUnusableError, StoreRefusedError


class CheckpointStoreError(CheckpointStoreUnusableError):
    """The store cannot be used as configured (credentials, bucket, endpoint) or a transfer failed."""


class CheckpointStoreRefusedError(CheckpointStoreError, StoreRefusedError):
    """Credentials or access refused, or no such bucket: a retry would be refused again (exit 7)."""


class CheckpointConflictError(CheckpointStoreError):
    """Another writer already committed a different checkpoint at this key."""


class CheckpointVerificationError(CheckpointRestoreError):
    """A committed checkpoint does not restore to what was saved."""


__all__ = [
    "CheckpointConflictError",
    "CheckpointRestoreError",
    "CheckpointStoreError",
    "CheckpointStoreRefusedError",
    "CheckpointVerificationError",
]
