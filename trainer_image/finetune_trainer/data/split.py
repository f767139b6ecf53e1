"""Deterministic train/validation/test split from a seed."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_sizes(n: int, validation: float, test: float) -> tuple[int, int]:
    """Sizes of validation and test; at least one each when asked for and there is data to spare."""

    def size(fraction: float) -> int:
        return 0 if fraction == 0 or n < 3 else max(1, round(n * fraction))

    return size(validation), size(test)


def split(items: Sequence[T], validation: float, test: float, seed: int) -> tuple[list[T], list[T], list[T]]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)  # noqa: S311 - reproducible, not cryptographic
    n_val, n_test = split_sizes(len(items), validation, test)
    test_idx, val_idx, train_idx = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return [items[i] for i in train_idx], [items[i] for i in val_idx], [items[i] for i in test_idx]
