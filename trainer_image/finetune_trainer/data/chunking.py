"""Chunk long texts to maxTokens and pack short examples into chunks.

A chunk is a list of segments. The collator gives each segment its own position ids
starting at 0 and no attention mask, so transformers builds a block-diagonal causal mask:
packed examples never attend to each other.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_trainer.data.tokenization import IGNORE_INDEX, Encoded


@dataclass
class Chunk:
    segments: list[Encoded] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(s.input_ids) for s in self.segments)


def split_long(encoded: Encoded, max_tokens: int) -> list[Encoded]:
    """Raw text longer than max_tokens becomes several pieces rather than being cut."""
    ids, labels = encoded.input_ids, encoded.labels
    return [
        Encoded(ids[i : i + max_tokens], labels[i : i + max_tokens]) for i in range(0, len(ids), max_tokens)
    ]


def pack(items: Sequence[Encoded], max_tokens: int) -> list[Chunk]:
    """Best-fit decreasing: each item goes into the fullest chunk that still has room, the oldest
    of equally full ones. Chunks are indexed by fill level, so finding it is a bisect rather than a
    scan of every chunk (which made 100k examples take tens of minutes)."""
    chunks: list[Chunk] = []
    levels: list[int] = []  # fill levels that hold chunks, ascending
    by_level: dict[int, list[int]] = {}  # fill level -> heap of chunk indices
    for item in sorted(items, key=lambda e: len(e.input_ids), reverse=True):
        size = len(item.input_ids)
        at = bisect.bisect_right(levels, max_tokens - size)
        if at:
            fill = levels[at - 1]
            index = heapq.heappop(by_level[fill])
            if not by_level[fill]:
                del by_level[fill], levels[at - 1]
            chunks[index].segments.append(item)
        else:
            index, fill = len(chunks), 0
            chunks.append(Chunk([item]))
        if fill + size not in by_level:
            bisect.insort(levels, fill + size)
        heapq.heappush(by_level.setdefault(fill + size, []), index)
    return chunks


def make_chunks(items: Sequence[Encoded], max_tokens: int, packing: bool) -> list[Chunk]:
    pieces = [piece for item in items for piece in split_long(item, max_tokens)]
    return pack(pieces, max_tokens) if packing else [Chunk([p]) for p in pieces]


def chunk_features(chunk: Chunk) -> dict[str, list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for segment in chunk.segments:
        ids += segment.input_ids
        # the first token of a segment is never predicted from the previous segment
        labels += [IGNORE_INDEX, *segment.labels[1:]]
        positions += list(range(len(segment.input_ids)))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


class PackedCollator:
    """Pads a batch; padding is its own segment (positions restart at 0), labels -100."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for f in features:
            pad = width - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(f["labels"] + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(f["position_ids"] + list(range(pad)))
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
