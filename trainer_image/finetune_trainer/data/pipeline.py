"""The preparation pipeline: load ► normalize ► strip boilerplate ► dedupe ► split ► tokenize ► chunk."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finetune_trainer.config import Dataset, S3Store
from finetune_trainer.data import cleaning
from finetune_trainer.data.chunking import Chunk, chunk_features, make_chunks
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.formats import Example, to_example
from finetune_trainer.data.report import DataReport, length_histogram
from finetune_trainer.data.sources import Record, load_records
from finetune_trainer.data.split import split
from finetune_trainer.data.tokenization import encode_all

# Fields that hold scraped documents, where repeated header/footer lines are boilerplate.
DOCUMENT_FIELDS = {"alpaca": ("input",), "text": ("text",), "sharegpt": ()}


@dataclass
class CleanData:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    report: DataReport


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    validation: list[dict[str, list[int]]]
    test: list[dict[str, list[int]]]
    test_examples: list[Example]
    validation_examples: list[Example]
    report: DataReport = field(default_factory=DataReport)


# --- cleaning --------------------------------------------------------------------------------------------


def _map_texts(record: Record, fmt: str, fn: Callable[[str, bool], str]) -> Record:
    """Apply fn(text, is_document) to every text of a record."""
    docs = DOCUMENT_FIELDS.get(fmt, ())
    out: Record = {}
    for key, value in record.items():
        if isinstance(value, str):
            out[key] = fn(value, key in docs)
        elif key in ("conversations", "messages") and isinstance(value, list):
            out[key] = [_map_turn(turn, fn) for turn in value]
        else:
            out[key] = value
    return out


def _map_turn(turn: Any, fn: Callable[[str, bool], str]) -> Any:
    if not isinstance(turn, dict):
        return turn
    return {
        k: fn(v, False) if k in ("value", "content") and isinstance(v, str) else v for k, v in turn.items()
    }


def clean_records(records: list[Record], ds: Dataset) -> tuple[list[Record], int]:
    """Normalize and strip boilerplate lines; returns the records and the number of lines removed."""
    pre = ds.preprocessing
    if pre.normalize:
        records = [_map_texts(r, ds.format, lambda t, _doc: cleaning.normalize_text(t)) for r in records]
    if not pre.strip_boilerplate:
        return records, 0
    documents = [
        str(r[key])
        for r in records
        for key in DOCUMENT_FIELDS.get(ds.format, ())
        if isinstance(r.get(key), str)
    ]
    repeated = cleaning.repeated_lines(documents, pre.repeated_line_min_docs, pre.repeated_line_min_fraction)
    removed = 0

    def strip(text: str, is_document: bool) -> str:
        nonlocal removed
        kept, count = cleaning.strip_lines(text, repeated if is_document else set())
        removed += count
        return kept

    return [_map_texts(r, ds.format, strip) for r in records], removed


def _examples(records: list[Record], ds: Dataset, name: str) -> list[Example]:
    return [to_example(r, ds.format, f"{name} example {i + 1}", ds.role_map) for i, r in enumerate(records)]


def clean_and_split(ds: Dataset, store: S3Store) -> CleanData:
    """Everything that needs no tokenizer; cheap enough to run before loading the model."""
    raw = load_records(ds.source, store, ds.hub_split)
    raw_test = (
        load_records(ds.test_source, store, ds.hub_split, "dataset.testSource") if ds.test_source else []
    )
    cleaned, lines_removed = clean_records(raw + raw_test, ds)
    pool = _examples(cleaned[: len(raw)], ds, "dataset.source")
    test = _examples(cleaned[len(raw) :], ds, "dataset.testSource")
    mode, threshold = ds.preprocessing.dedupe, ds.preprocessing.near_duplicate_threshold
    keep_test, test_counts = cleaning.dedupe([e.dedupe_text() for e in test], mode, threshold)
    test = [test[i] for i in keep_test]
    keep, counts = cleaning.dedupe(
        [e.dedupe_text() for e in pool], mode, threshold, [e.dedupe_text() for e in test]
    )
    pool = [pool[i] for i in keep]
    if not pool:
        raise DataError(
            f"dataset.source: {ds.source!r} has no examples left after cleaning (fix: check the data)"
        )
    examples = len(pool) + len(test)
    if ds.test_source:
        train, validation, _ = split(pool, ds.split.validation, 0.0, ds.split.seed)
    else:
        train, validation, test = split(pool, ds.split.validation, ds.split.test, ds.split.seed)
    report = DataReport(
        raw=len(raw) + len(raw_test),
        duplicates_removed=counts.exact + test_counts.exact,
        near_duplicates_removed=counts.near + test_counts.near,
        boilerplate_lines_removed=lines_removed,
        examples=examples,
    )
    return CleanData(train, validation, test, report)


# --- tokenization and chunking ---------------------------------------------------------------------------


def _chunked(
    tokenizer: Any, examples: list[Example], ds: Dataset, max_tokens: int
) -> tuple[list[Chunk], list[int], int]:
    if not examples:
        return [], [], 0
    encoded = encode_all(tokenizer, examples, max_tokens, ds.train_on_prompt)
    lengths = [len(e.input_ids) for e in encoded]
    return make_chunks(encoded, max_tokens, ds.chunking.packing), lengths, sum(e.truncated for e in encoded)


def tokenize_splits(clean: CleanData, tokenizer: Any, ds: Dataset, max_tokens: int) -> PreparedData:
    report = clean.report.model_copy()
    splits = {}
    lengths: list[int] = []
    for name, examples in (("train", clean.train), ("validation", clean.validation), ("test", clean.test)):
        chunks, split_lengths, truncated = _chunked(tokenizer, examples, ds, max_tokens)
        splits[name] = [chunk_features(c) for c in chunks]
        lengths += split_lengths
        report.truncated += truncated
    report.tokens = sum(lengths)
    report.chunks = sum(len(v) for v in splits.values())
    report.split.train, report.split.validation, report.split.test = (
        len(clean.train),
        len(clean.validation),
        len(clean.test),
    )
    report.length_histogram = length_histogram(lengths)
    report.fingerprint = _fingerprint(splits["train"])
    return PreparedData(
        splits["train"], splits["validation"], splits["test"], clean.test, clean.validation, report
    )


def _fingerprint(features: list[dict[str, list[int]]]) -> str:
    digest = hashlib.sha256()
    for f in features:
        digest.update(bytes(str(f["input_ids"]), "ascii"))
    return digest.hexdigest()[:16]
