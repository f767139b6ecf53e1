"""`MANIFEST.json`: what a committed checkpoint holds, written after every file is stored."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune_trainer.checkpoints.layout import MANIFEST, MARKERS

FORMAT_VERSION = 1
_BLOCK = 4 * 1024 * 1024
Fingerprint = dict[str, float]


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str = Field(description="relative to the checkpoint folder, '/'-separated")
    size: int
    sha256: str


class JobRef(BaseModel):
    namespace: str
    name: str
    uid: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: int = FORMAT_VERSION
    kind: Literal["step", "final"] = "step"
    job: JobRef
    step: int
    epoch: float | None = None
    created: str = Field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    metrics: dict[str, float] = Field(default_factory=dict)
    config_sha256: str = ""
    versions: dict[str, str] = Field(default_factory=dict)
    seeds: dict[str, int] = Field(default_factory=dict)
    data_fingerprint: str = ""
    restore_fingerprint: Fingerprint | None = Field(
        default=None, description="loss/logits on a fixed batch, recorded at save time"
    )
    world_size: int = Field(
        default=1, description="training processes whose per-rank state (ZeRO partitions) it holds"
    )
    files: list[FileEntry]

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        return cls.model_validate_json(data)

    def same_files(self, other: Manifest) -> bool:
        return sorted(self.files, key=lambda f: f.path) == sorted(other.files, key=lambda f: f.path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_files(folder: Path) -> Iterator[Path]:
    """Every regular file under the folder, sub-folders included (DeepSpeed writes some)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not (path.parent == folder and path.name in (MANIFEST, *MARKERS)):
            yield path


def hash_folder(folder: Path) -> list[FileEntry]:
    return [
        FileEntry(path=p.relative_to(folder).as_posix(), size=p.stat().st_size, sha256=sha256_file(p))
        for p in checkpoint_files(folder)
    ]


def check_file(path: Path, entry: FileEntry) -> str | None:
    """Why a downloaded file does not match its manifest entry, or None."""
    if not path.is_file():
        return f"{entry.path}: missing"
    size = path.stat().st_size
    if size != entry.size:
        return f"{entry.path}: size {size} bytes, manifest says {entry.size}"
    digest = sha256_file(path)
    if digest != entry.sha256:
        return f"{entry.path}: sha256 {digest[:12]}…, manifest says {entry.sha256[:12]}…"
    return None


def compare_fingerprints(
    recorded: Mapping[str, float], restored: Mapping[str, float], rel_tol: float, abs_tol: float
) -> str | None:
    """Why two fingerprints differ beyond the tolerance, or None."""
    problems = []
    for name, expected in sorted(recorded.items()):
        got = restored.get(name)
        if got is None:
            problems.append(f"{name} missing after restore")
        elif abs(got - expected) > max(abs_tol, rel_tol * abs(expected)):
            problems.append(f"{name} {got:.6g} after restore, {expected:.6g} at save")
    return "; ".join(problems) or None


def read_json(path: Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
