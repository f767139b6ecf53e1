"""`CheckpointStore`: commit, list, download, verify, retain and resolve checkpoints of one job run.

A checkpoint is a folder whose files are stored first and whose `MANIFEST.json` is written last;
a folder without a manifest is not a checkpoint. `VERIFIED` and `INVALID` markers next to the
manifest record what verification found.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from finetune_trainer.checkpoints import layout, retention
from finetune_trainer.checkpoints.client import TransferSettings
from finetune_trainer.checkpoints.errors import CheckpointConflictError
from finetune_trainer.checkpoints.layout import INVALID, MANIFEST, VERIFIED, JobLocation
from finetune_trainer.checkpoints.manifest import (
    Fingerprint,
    Manifest,
    check_file,
    compare_fingerprints,
    sha256_bytes,
)
from finetune_trainer.checkpoints.objects import ObjectExistsError, ObjectInfo, Objects
from finetune_trainer.config import JobIdentity, S3Store

log = logging.getLogger(__name__)
RestoreCheck = Callable[[Path], Mapping[str, float]]
"""Loads a downloaded checkpoint folder into a fresh model and returns its fingerprint."""


@dataclass(frozen=True)
class Checkpoint:
    bucket: str
    key: str
    step: int | None  # None: the final artifact
    committed: bool
    verified: bool = False
    invalid: bool = False
    committed_at: datetime | None = None

    @property
    def uri(self) -> str:
        return layout.uri(self.bucket, self.key)


@dataclass(frozen=True)
class Skipped:
    uri: str
    step: int | None
    reason: str


@dataclass
class Selection:
    checkpoint: Checkpoint | None
    manifest: Manifest | None
    skipped: list[Skipped] = field(default_factory=list)


@dataclass(frozen=True)
class Verification:
    ok: bool
    reason: str = ""
    fingerprint: Fingerprint | None = None


class CorruptCheckpointError(Exception):
    """A downloaded file does not match the manifest."""


@dataclass(frozen=True)
class Tolerance:
    rel: float = 1e-3
    abs: float = 1e-5


class CheckpointStore:
    def __init__(
        self,
        store: S3Store,
        job: JobIdentity,
        *,
        transfer: TransferSettings | None = None,
        restore_check: RestoreCheck | None = None,
        tolerance: Tolerance | None = None,
        primary_metric: str = "eval_loss",
        scratch_dir: Path | None = None,
        client: object = None,
    ) -> None:
        self.location = JobLocation(store.bucket, store.prefix, job.namespace, job.name, job.uid)
        self.objects = Objects(store, transfer or TransferSettings(), client)
        self.restore_check = restore_check
        self.tolerance = tolerance or Tolerance()
        self.primary_metric = primary_metric
        self.scratch_dir = scratch_dir
        self._manifests: dict[str, Manifest] = {}

    # --- writing ---------------------------------------------------------------------------------------

    def key_for(self, step: int | None) -> str:
        return self.location.final_key if step is None else self.location.step_key(step)

    def commit(self, local_dir: Path, manifest: Manifest) -> Checkpoint:
        """Upload every file of the manifest, then the manifest. Idempotent for the same files."""
        step = None if manifest.kind == "final" else manifest.step
        key = self.key_for(step)
        if self._prepare_key(key, manifest, replace=step is None):
            return self._checkpoint(key, step, committed=True)
        for entry in manifest.files:
            self.objects.upload(local_dir / entry.path, f"{key}/{entry.path}")
        try:
            self.objects.put_if_absent(f"{key}/{MANIFEST}", manifest.to_bytes())
        except ObjectExistsError:
            self._check_same(key, manifest)  # a concurrent writer got there first
        self._manifests[key] = manifest
        log.info("checkpoint committed: %s", layout.uri(self.location.bucket, key))
        return self._checkpoint(key, step, committed=True)

    def commit_stored(self, manifest: Manifest) -> Checkpoint:
        """Write the manifest of a step whose files every rank has stored already (see `parts`).

        Unlike `commit`, nothing under the folder is cleared first: other ranks' files are there.
        An earlier manifest at this step that verification marked invalid is replaced."""
        key = self.key_for(manifest.step)
        existing = self.read_manifest_key(key)
        if existing is not None and existing.same_files(manifest):
            return self._checkpoint(key, manifest.step, committed=True)
        if existing is not None:
            names = {o.key.removeprefix(key + "/") for o in self.objects.listing(key)}
            if INVALID not in names:
                raise self._conflict(key)
            # The manifest goes first: the folder must not look like a checkpoint meanwhile.
            self.objects.delete([f"{key}/{MANIFEST}"])
            self.objects.delete([f"{key}/{name}" for name in (INVALID, VERIFIED) if name in names])
            self._manifests.pop(key, None)
        try:
            self.objects.put_if_absent(f"{key}/{MANIFEST}", manifest.to_bytes())
        except ObjectExistsError:
            self._check_same(key, manifest)
        self._manifests[key] = manifest
        log.info("checkpoint committed: %s", layout.uri(self.location.bucket, key))
        return self._checkpoint(key, manifest.step, committed=True)

    def _prepare_key(self, key: str, manifest: Manifest, replace: bool) -> bool:
        """True when these files are already committed here. Clears leftovers of an interrupted
        upload, an invalid checkpoint, and with `replace` a different committed one."""
        names = {o.key.removeprefix(key + "/"): o for o in self.objects.listing(key)}
        if MANIFEST in names and INVALID not in names:
            existing = self.read_manifest_key(key)
            if existing is not None and existing.same_files(manifest):
                return True
            if not replace:
                raise self._conflict(key)
        if names:
            log.info("clearing %d objects under %s before upload", len(names), key)
            self._delete_folder(key, list(names.values()))
        return False

    def _check_same(self, key: str, manifest: Manifest) -> None:
        self._manifests.pop(key, None)
        existing = self.read_manifest_key(key)
        if existing is None or not existing.same_files(manifest):
            raise self._conflict(key)

    def _conflict(self, key: str) -> CheckpointConflictError:
        return CheckpointConflictError(
            f"checkpoints.store: {layout.uri(self.location.bucket, key)} is already committed with "
            "different files (fix: make sure only one trainer writes this job's checkpoints)"
        )

    def mark_verified(self, checkpoint: Checkpoint, fingerprint: Mapping[str, float] | None) -> None:
        body = self.objects.get(f"{checkpoint.key}/{MANIFEST}") or b""
        marker = {"verifiedAt": _now(), "manifestSha256": sha256_bytes(body), "fingerprint": fingerprint}
        self.objects.put(f"{checkpoint.key}/{VERIFIED}", json.dumps(marker, indent=2).encode())

    def mark_invalid(self, checkpoint: Checkpoint, reason: str) -> None:
        marker = {"invalidAt": _now(), "reason": reason}
        self.objects.put(f"{checkpoint.key}/{INVALID}", json.dumps(marker, indent=2).encode())
        log.warning("checkpoint %s is invalid: %s", checkpoint.uri, reason)

    def delete(self, checkpoint: Checkpoint) -> None:
        self._delete_folder(checkpoint.key, list(self.objects.listing(checkpoint.key)))

    def _delete_folder(self, key: str, objects: list[ObjectInfo]) -> None:
        # The manifest goes first: a half-deleted folder must not look like a checkpoint.
        manifest = f"{key}/{MANIFEST}"
        keys = [o.key for o in objects]
        if manifest in keys:
            self.objects.delete([manifest])
        self.objects.delete([k for k in keys if k != manifest])
        self._manifests.pop(key, None)

    # --- reading ---------------------------------------------------------------------------------------

    def checkpoints(self) -> list[Checkpoint]:
        """Step checkpoints of this run, oldest first, committed or not (`final` excluded)."""
        return self._list_under(self.location.checkpoints_key)

    def final(self) -> Checkpoint | None:
        found = [c for c in self._list_under(self.location.checkpoints_key, steps=False) if c.step is None]
        return found[0] if found else None

    def _list_under(self, prefix: str, steps: bool = True) -> list[Checkpoint]:
        folders: dict[str, dict[str, ObjectInfo]] = {}
        for obj in self.objects.listing(prefix):
            folder, _, name = obj.key.removeprefix(prefix + "/").partition("/")
            folders.setdefault(f"{prefix}/{folder}", {})[name] = obj
        found = []
        for key, names in folders.items():
            step = layout.step_of(key)
            if (step is None) == steps:
                continue
            manifest = names.get(MANIFEST)
            found.append(
                Checkpoint(
                    self.location.bucket,
                    key,
                    step,
                    committed=manifest is not None,
                    verified=VERIFIED in names,
                    invalid=INVALID in names,
                    committed_at=manifest.modified if manifest else None,
                )
            )
        return sorted(found, key=lambda c: c.step or 0)

    def read_manifest(self, checkpoint: Checkpoint) -> Manifest:
        manifest = self.read_manifest_key(checkpoint.key)
        if manifest is None:
            raise CorruptCheckpointError(f"{checkpoint.uri}: no {MANIFEST}")
        return manifest

    def read_manifest_key(self, key: str) -> Manifest | None:
        if key in self._manifests:
            return self._manifests[key]
        body = self.objects.get(f"{key}/{MANIFEST}")
        if body is None:
            return None
        try:
            manifest = Manifest.from_bytes(body)
        except ValueError as exc:
            raise CorruptCheckpointError(f"{MANIFEST} is unreadable: {exc}") from None
        self._manifests[key] = manifest
        return manifest

    def download(
        self, checkpoint: Checkpoint, local_dir: Path, wanted: Callable[[str], bool] | None = None
    ) -> Manifest:
        """Download every file of the manifest (or those `wanted`, by path) and check its size and
        sha256 (CorruptCheckpointError)."""
        manifest = self.read_manifest(checkpoint)
        local_dir.mkdir(parents=True, exist_ok=True)
        for entry in manifest.files:
            if wanted is not None and not wanted(entry.path):
                continue
            target = local_dir / entry.path
            found = self.objects.download(f"{checkpoint.key}/{entry.path}", target)
            problem = check_file(target, entry) if found else f"{entry.path}: missing from the store"
            if problem:
                raise CorruptCheckpointError(problem)
        (local_dir / MANIFEST).write_bytes(manifest.to_bytes())
        return manifest

    def marker(self, checkpoint: Checkpoint, name: str) -> dict[str, object]:
        body = self.objects.get(f"{checkpoint.key}/{name}")
        try:
            value = json.loads(body or b"{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    # --- verification ----------------------------------------------------------------------------------

    def verify(self, checkpoint: Checkpoint) -> Verification:
        """Download, check every file, restore into a fresh model and compare fingerprints; then
        write the VERIFIED or INVALID marker."""
        if self.scratch_dir is not None:
            self.scratch_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="verify-", dir=self.scratch_dir))
        try:
            result = self._verify_in(checkpoint, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if result.ok:
            self.mark_verified(checkpoint, result.fingerprint)
            log.info("checkpoint verified: %s", checkpoint.uri)
        else:
            self.mark_invalid(checkpoint, result.reason)
        return result

    def _verify_in(self, checkpoint: Checkpoint, folder: Path) -> Verification:
        try:
            manifest = self.download(checkpoint, folder)
        except CorruptCheckpointError as exc:
            return Verification(False, f"corrupt: {exc}")
        if self.restore_check is None:
            return Verification(True)
        try:
            restored = dict(self.restore_check(folder))
        except Exception as exc:
            return Verification(False, f"restore failed: {type(exc).__name__}: {exc}")
        if manifest.restore_fingerprint:
            t = self.tolerance
            problem = compare_fingerprints(manifest.restore_fingerprint, restored, t.rel, t.abs)
            if problem:
                return Verification(False, f"restored model differs from the saved one: {problem}", restored)
        return Verification(True, fingerprint=restored)

    def latest_verified(self, verify_pending: bool = True) -> Selection:
        """The newest verified checkpoint of this run, and why each newer one was skipped.
        With `verify_pending`, a committed but unverified checkpoint (say, the one saved on
        SIGTERM) is verified now."""
        return self._select(reversed(self.checkpoints()), verify_pending)

    def _select(self, candidates: Iterable[Checkpoint], verify_pending: bool) -> Selection:
        skipped: list[Skipped] = []
        for checkpoint in candidates:
            reason = self._usable(checkpoint, verify_pending)
            if reason is None:
                return Selection(checkpoint, self.read_manifest(checkpoint), skipped)
            skipped.append(Skipped(checkpoint.uri, checkpoint.step, reason))
        return Selection(None, None, skipped)

    def _usable(self, checkpoint: Checkpoint, verify_pending: bool) -> str | None:
        """None when the checkpoint can be restored, else why not."""
        if not checkpoint.committed:
            return f"no {MANIFEST}: its upload did not finish"
        if checkpoint.invalid:
            return f"marked invalid: {self.marker(checkpoint, INVALID).get('reason', 'no reason recorded')}"
        try:
            manifest_body = self.objects.get(f"{checkpoint.key}/{MANIFEST}") or b""
            Manifest.from_bytes(manifest_body)
        except ValueError as exc:
            self.mark_invalid(checkpoint, f"{MANIFEST} is unreadable: {exc}")
            return f"{MANIFEST} is unreadable"
        if checkpoint.verified:
            recorded = self.marker(checkpoint, VERIFIED).get("manifestSha256")
            if recorded == sha256_bytes(manifest_body):
                return None
            if not verify_pending:
                return f"{MANIFEST} changed after it was verified"
        elif not verify_pending:
            return "not verified yet"
        result = self.verify(checkpoint)
        return None if result.ok else result.reason

    def resolve(self, resume_from: str, verify_pending: bool = True) -> Selection:
        """`latest`: the newest verified checkpoint of any run of this job (same namespace and
        name), this run first. `s3://…`: that checkpoint, verified now if it was not yet."""
        if resume_from == "latest":
            own = self.latest_verified(verify_pending)
            if own.checkpoint is not None:
                return own
            others = self._other_runs()
            selection = self._select(others, verify_pending)
            selection.skipped[:0] = own.skipped
            return selection
        bucket, key = layout.parse_uri(resume_from, "checkpoints.resumeFrom")
        if bucket != self.location.bucket:
            raise ValueError(
                f"checkpoints.resumeFrom: got {resume_from!r}: bucket {bucket!r} is not the checkpoint "
                f"bucket {self.location.bucket!r} (fix: copy the checkpoint into it or point "
                "checkpoints.store.bucket at it)"
            )
        parent, _, _ = key.rpartition("/")
        matches = [c for c in self._list_under(parent, steps=layout.step_of(key) is not None) if c.key == key]
        target = matches or [Checkpoint(bucket, key, layout.step_of(key), committed=False)]
        return self._select(target, verify_pending)

    def _other_runs(self) -> list[Checkpoint]:
        job_key = self.location.job_key
        runs = {o.key.removeprefix(job_key + "/").split("/", 1)[0] for o in self.objects.listing(job_key)}
        found = [
            c
            for uid in sorted(runs - {self.location.uid})
            for c in self._list_under(layout.join(job_key, uid, "checkpoints"))
            if c.committed
        ]
        oldest = datetime.min.replace(tzinfo=UTC)
        return sorted(found, key=lambda c: c.committed_at or oldest, reverse=True)

    # --- retention -------------------------------------------------------------------------------------

    def apply_retention(self, keep: int) -> list[Checkpoint]:
        """Delete what retention does not keep; return the deleted checkpoints."""
        checkpoints = self.checkpoints()
        committed = [c for c in checkpoints if c.committed and c.step is not None]
        candidates = [
            retention.Candidate(c.step or 0, c.verified, c.invalid, self._metric(c)) for c in committed
        ]
        greater = retention.greater_is_better(self.primary_metric)
        doomed = set(retention.steps_to_delete(candidates, keep, greater))
        newest = max((c.step or 0 for c in committed), default=0)
        # Folders without a manifest older than the newest commit are interrupted uploads.
        deleted = [
            c
            for c in checkpoints
            if (c.committed and c.step in doomed) or (not c.committed and (c.step or 0) < newest)
        ]
        for checkpoint in deleted:
            self.delete(checkpoint)
            log.info("retention deleted %s", checkpoint.uri)
        return deleted

    def _metric(self, checkpoint: Checkpoint) -> float | None:
        if checkpoint.invalid:
            return None
        try:
            manifest = self.read_manifest(checkpoint)
        except CorruptCheckpointError:
            return None
        return manifest.metrics.get(self.primary_metric)

    def _checkpoint(self, key: str, step: int | None, committed: bool) -> Checkpoint:
        return Checkpoint(self.location.bucket, key, step, committed=committed)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
