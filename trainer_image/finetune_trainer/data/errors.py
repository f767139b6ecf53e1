"""Data errors: stop the run before training with exit code 4 (DATA_REFUSED)."""

from __future__ import annotations

import json
from typing import Any

from finetune_trainer.redact import redact

SAMPLE_CHARS = 240


class DataError(Exception):
    """Bad or refused data. The message names what is wrong and how to fix it."""


def show_sample(sample: Any) -> str:
    """A sample for an error message: truncated, with secret values masked."""
    text = sample if isinstance(sample, str) else json.dumps(sample, ensure_ascii=False, default=str)
    text = redact(text)
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + "…"


def exceeds(count: int, total: int, share: float) -> bool:
    """More than `share` of `total`; a share of 1.0 is never exceeded."""
    return total > 0 and count > share * total
