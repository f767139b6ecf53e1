"""The preparation pipeline: load ► normalize ► strip boilerplate ► dedupe ► split ► tokenize ► chunk."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_trainer.config import Dataset, Preprocessing, S3Store
from finetune_trainer.data import cleaning
from finetune_trainer.data.chunking import chunk_features, make_chunks
from finetune_trainer.data.errors import DataError, exceeds, show_sample
from finetune_trainer.data.formats import Example, to_example
from finetune_trainer.data.report import DataReport, length_histogram
from finetune_trainer.data.sources import Record, load_records
from finetune_trainer.data.split import split
from finetune_trainer.data.tokenization import (
    BadExample,
    Dropped,
    Encoding,
    bad_examples_message,
    encode_all,
    reason_counts,
    refuse_bad_examples,
)

log = logging.getLogger(__name__)

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
        """Only documents are stripped: a menu-like line in an answer or instruction is what was meant."""
        nonlocal removed
        if not is_document:
            return text
        kept, count = cleaning.strip_lines(text, repeated)
        removed += count
        return kept

    return [_map_texts(r, ds.format, strip) for r in records], removed


def _blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def has_empty_answer(record: Record, fmt: str, role_map: Mapping[str, str]) -> bool:
    """A blank answer (or blank text) left after cleaning; a missing field is a format mistake instead."""
    if fmt == "sharegpt":
        turns = record.get("conversations", record.get("messages"))
        return isinstance(turns, list) and any(
            isinstance(t, dict)
            and role_map.get(str(t.get("from", t.get("role", "")))) == "assistant"
            and _blank(t.get("value", t.get("content")))
            for t in turns
        )
    key = {"alpaca": "output", "text": "text"}.get(fmt)
    return key is not None and _blank(record.get(key))


def _examples(records: list[Record], ds: Dataset, name: str) -> tuple[list[Example], list[Dropped]]:
    examples: list[Example] = []
    dropped: list[Dropped] = []
    for i, record in enumerate(records):
        if has_empty_answer(record, ds.format, ds.role_map):
            dropped.append(Dropped(i, BadExample.EMPTY_ANSWER, show_sample(record)))
        else:
            examples.append(to_example(record, ds.format, f"{name} example {i + 1}", ds.role_map))
    return examples, dropped


def check_duplicate_share(exact: int, near: int, total: int, pre: Preprocessing, where: str) -> list[str]:
    """Warnings for many duplicates; DataError for so many that the data is probably not what was meant."""
    removed = exact + near
    numbers = (
        f"{where}: {removed} of {total} examples ({removed / max(1, total):.0%}) were duplicates or near "
        f"duplicates ({exact} exact, {near} near)"
    )
    if exceeds(removed, total, pre.max_duplicate_share):
        raise DataError(
            f"{numbers}, above dataset.preprocessing.maxDuplicateShare {pre.max_duplicate_share:g} "
            "(fix: remove the repeated examples from the data, set dataset.preprocessing.dedupe: exact "
            "if near duplicates are meant to stay, or raise dataset.preprocessing.maxDuplicateShare)"
        )
    if exceeds(removed, total, pre.warn_duplicate_share):
        return [
            f"{numbers}, above dataset.preprocessing.warnDuplicateShare {pre.warn_duplicate_share:g}; "
            "they were removed (check how the data was collected)"
        ]
    return []


def _dedupe(
    pool: list[Example], test: list[Example], pre: Preprocessing
) -> tuple[list[int], list[int], cleaning.DedupeCounts]:
    """Kept indices of pool and test, and the counts of both; a test example wins over its pool copies."""
    mode, threshold = pre.dedupe, pre.near_duplicate_threshold
    pool_texts, test_texts = [e.dedupe_text() for e in pool], [e.dedupe_text() for e in test]
    template = cleaning.template_lines(pool_texts + test_texts) if mode == "exact+near" else frozenset()
    keep_test, test_counts = cleaning.dedupe(test_texts, mode, threshold, template=template)
    kept_test_texts = [test_texts[i] for i in keep_test]
    keep, counts = cleaning.dedupe(pool_texts, mode, threshold, kept_test_texts, template)
    total = cleaning.DedupeCounts(counts.exact + test_counts.exact, counts.near + test_counts.near)
    return keep, keep_test, total


def _where(ds: Dataset) -> str:
    return "dataset.source and dataset.testSource" if ds.test_source else "dataset.source"


def clean_and_split(ds: Dataset, store: S3Store) -> CleanData:
    """Everything that needs no tokenizer; cheap enough to run before loading the model."""
    raw = load_records(ds.source, store, ds.hub_split)
    raw_test = (
        load_records(ds.test_source, store, ds.hub_split, "dataset.testSource") if ds.test_source else []
    )
    log.info("cleaning %d records from %s", len(raw) + len(raw_test), _where(ds))
    cleaned, lines_removed = clean_records(raw + raw_test, ds)
    pool, pool_dropped = _examples(cleaned[: len(raw)], ds, "dataset.source")
    test, test_dropped = _examples(cleaned[len(raw) :], ds, "dataset.testSource")
    dropped = pool_dropped + test_dropped
    reasons = reason_counts(dropped)
    first = next(iter(dropped), None)
    refuse_bad_examples(reasons, len(cleaned), ds.preprocessing.max_bad_example_share, _where(ds), first)
    keep, keep_test, counts = _dedupe(pool, test, ds.preprocessing)
    warnings = check_duplicate_share(
        counts.exact, counts.near, len(pool) + len(test), ds.preprocessing, _where(ds)
    )
    if first is not None:
        warnings.append(f"{bad_examples_message(reasons, len(cleaned), _where(ds), first)} (dropped)")
    pool, test = [pool[i] for i in keep], [test[i] for i in keep_test]
    if not pool:
        raise DataError(
            f"dataset.source: {ds.source!r} has no examples left after cleaning (fix: check the data)"
        )
    examples = len(pool) + len(test)
    if ds.test_source:
        train, validation, _ = split(pool, ds.split.validation, 0.0, ds.split.seed)
    else:
        train, validation, test = split(pool, ds.split.validation, ds.split.test, ds.split.seed)
    for warning in warnings:
        log.warning("%s", warning)
    report = DataReport(
        raw=len(raw) + len(raw_test),
        duplicates_removed=counts.exact,
        near_duplicates_removed=counts.near,
        boilerplate_lines_removed=lines_removed,
        examples=examples,
        bad_examples_dropped=len(dropped),
        bad_example_reasons=reasons,
        warnings=warnings,
    )
    return CleanData(train, validation, test, report)


# --- tokenization and chunking ---------------------------------------------------------------------------


def _encoded(tokenizer: Any, examples: list[Example], ds: Dataset, max_tokens: int) -> Encoding:
    return encode_all(tokenizer, examples, max_tokens, ds.train_on_prompt) if examples else Encoding()


def tokenize_splits(clean: CleanData, tokenizer: Any, ds: Dataset, max_tokens: int) -> PreparedData:
    report = clean.report.model_copy(deep=True)
    splits: dict[str, list[dict[str, list[int]]]] = {}
    kept: dict[str, list[Example]] = {}
    lengths: list[int] = []
    dropped: list[Dropped] = []
    for name, examples in (("train", clean.train), ("validation", clean.validation), ("test", clean.test)):
        encoding = _encoded(tokenizer, examples, ds, max_tokens)
        kept[name] = [examples[i] for i in encoding.kept]
        chunks = make_chunks(encoding.encoded, max_tokens, ds.chunking.packing)
        splits[name] = [chunk_features(c) for c in chunks]
        lengths += [len(e.input_ids) for e in encoding.encoded]
        report.truncated += sum(e.truncated for e in encoding.encoded)
        dropped += encoding.dropped
    _count_dropped(report, dropped, ds)
    if not kept["train"]:
        raise DataError(
            f"dataset.source: {ds.source!r} has no training examples left after dropping those that cannot "
            "be trained on (fix: see badExampleReasons in the data report)"
        )
    report.tokens = sum(lengths)
    report.chunks = sum(len(v) for v in splits.values())
    report.split.train, report.split.validation, report.split.test = (
        len(kept["train"]),
        len(kept["validation"]),
        len(kept["test"]),
    )
    report.examples = len(kept["train"]) + len(kept["validation"]) + len(kept["test"])
    report.length_histogram = length_histogram(lengths)
    report.fingerprint = _fingerprint(splits["train"])
    return PreparedData(
        splits["train"], splits["validation"], splits["test"], kept["test"], kept["validation"], report
    )


def _count_dropped(report: DataReport, dropped: list[Dropped], ds: Dataset) -> None:
    """Add the examples dropped at tokenization to those dropped at cleaning; refuse too many."""
    if not dropped:
        return
    reasons = dict(report.bad_example_reasons)
    for reason, count in reason_counts(dropped).items():
        reasons[reason] = reasons.get(reason, 0) + count
    checked = report.examples + report.bad_examples_dropped
    refuse_bad_examples(reasons, checked, ds.preprocessing.max_bad_example_share, _where(ds), dropped[0])
    warning = (
        f"{bad_examples_message(reason_counts(dropped), report.examples, _where(ds), dropped[0])} (dropped)"
    )
    log.warning("%s", warning)
    report.bad_examples_dropped, report.bad_example_reasons = sum(reasons.values()), reasons
    report.warnings = [*report.warnings, warning]


def _fingerprint(features: list[dict[str, list[int]]]) -> str:
    digest = hashlib.sha256()
    for f in features:
        digest.update(bytes(str(f["input_ids"]), "ascii"))
    return digest.hexdigest()[:16]
