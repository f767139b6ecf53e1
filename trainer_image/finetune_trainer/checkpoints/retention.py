"""Which committed checkpoints to delete: keep the newest `keep`, the latest verified and the best."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LOWER_IS_BETTER = frozenset({"eval_loss", "loss", "perplexity", "eval_perplexity"})


@dataclass(frozen=True)
class Candidate:
    step: int
    verified: bool = False
    invalid: bool = False
    metric: float | None = None


def greater_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def best_step(candidates: Sequence[Candidate], greater: bool) -> int | None:
    scored = [c for c in candidates if c.metric is not None and not c.invalid]
    if not scored:
        return None
    # Ties go to the newer checkpoint.
    best = max(scored, key=lambda c: ((c.metric if greater else -c.metric), c.step))  # type: ignore[operator]
    return best.step


def latest_verified_step(candidates: Sequence[Candidate]) -> int | None:
    return max((c.step for c in candidates if c.verified and not c.invalid), default=None)


def steps_to_delete(candidates: Sequence[Candidate], keep: int, greater: bool) -> list[int]:
    """Invalid checkpoints are never kept; they do not count towards `keep`."""
    usable = sorted((c for c in candidates if not c.invalid), key=lambda c: c.step, reverse=True)
    kept = {c.step for c in usable[:keep]}
    kept |= {s for s in (latest_verified_step(usable), best_step(usable, greater)) if s is not None}
    return sorted(c.step for c in candidates if c.step not in kept)
