"""Where checkpoints live: `<prefix>/<namespace>/<job>/<uid>/checkpoints/step-<N>/…` and `…/final/`."""

from __future__ import annotations

import re
from dataclasses import dataclass

MANIFEST = "MANIFEST.json"
VERIFIED = "VERIFIED"
INVALID = "INVALID"
FINAL = "final"
MARKERS = (VERIFIED, INVALID)
_STEP = re.compile(r"step-(\d+)$")


@dataclass(frozen=True)
class JobLocation:
    """The folder of one FineTuneJob run (one uid) in the bucket."""

    bucket: str
    prefix: str
    namespace: str
    name: str
    uid: str

    @property
    def job_key(self) -> str:
        """All runs of this job name, any uid."""
        return join(self.prefix, self.namespace, self.name)

    @property
    def checkpoints_key(self) -> str:
        return join(self.job_key, self.uid, "checkpoints")

    def step_key(self, step: int) -> str:
        return join(self.checkpoints_key, f"step-{step}")

    @property
    def final_key(self) -> str:
        return join(self.checkpoints_key, FINAL)


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def parse_uri(value: str, field: str) -> tuple[str, str]:
    """`s3://bucket/key` to (bucket, key without trailing slash)."""
    bucket, _, key = value.removeprefix("s3://").partition("/")
    if not value.startswith("s3://") or not bucket or not key.strip("/"):
        raise ValueError(
            f"{field}: got {value!r}: not an s3:// checkpoint URI "
            "(fix: use 'latest' or s3://bucket/<prefix>/<ns>/<job>/<uid>/checkpoints/step-<N>)"
        )
    return bucket, key.strip("/")


def step_of(key: str) -> int | None:
    """The step of a `…/step-<N>` folder key; None for `final` and anything else."""
    match = _STEP.search(key.rstrip("/"))
    return int(match.group(1)) if match else None
