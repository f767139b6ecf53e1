"""Cleaning: normalization, boilerplate, exact and near duplicates, including across splits."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from finetune_trainer.config import Dataset, S3Store, Split
from finetune_trainer.data import cleaning
from finetune_trainer.data.pipeline import clean_and_split
from finetune_trainer.testing.tiny import QUESTION, WORDS, synthetic_dataset, write_jsonl

NAV = "Home | Products | About us | Contact"
COOKIE = "We use cookies to improve your experience. Accept all cookies"
FOOTER = "Copyright 2024 Example Corp. All rights reserved."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("caf\u00c3\u00a9 au lait", "café au lait"),  # mojibake repaired
        ("e\u0301", "é"),  # NFC
        ("a\u200bb\ufeff", "ab"),  # zero-width space, byte-order mark
        ("line  \r\nnext\t\r\n", "line\nnext"),  # trailing whitespace, Windows line ends
        ("\n\n    indented()\n", "    indented()"),  # blank lines around go, indentation stays
        ("def f():\n\treturn 1\n\n\ndef g(): ...", "def f():\n\treturn 1\n\n\ndef g(): ..."),
        ("name    value\nx       1", "name    value\nx       1"),  # aligned columns
        ("\u201cquoted\u201d \u2018so\u2019", "\u201cquoted\u201d \u2018so\u2019"),  # curly quotes stay
        ("\u4f60\u597d\uff0c\u4e16\u754c", "\u4f60\u597d\uff0c\u4e16\u754c"),  # fullwidth CJK comma stays
        ("write &amp; for &", "write &amp; for &"),  # entities in prose are content
        (
            "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
            "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
        ),  # Persian ZWNJ stays
        ("\U0001f469\u200d\U0001f4bb", "\U0001f469\u200d\U0001f4bb"),  # emoji ZWJ sequence stays
    ],
)
def test_normalize_text(text: str, expected: str) -> None:
    assert cleaning.normalize_text(text) == expected


@pytest.mark.parametrize(
    ("line", "boilerplate"),
    [
        (NAV, True),
        (COOKIE, True),
        ("Skip to content", True),
        ("Home | About | Contact", True),
        ("Home > Docs > API", True),
        ("Home \u00bb Blog \u00bb Latest posts", True),
        ("  Home \u2022 Shop \u2022 Cart", True),
        ("The river runs past the old mill | a quiet place.", False),
        ("| name | value | unit |", False),
        ("src/main/java", False),
        ("read/write/execute", False),
        ("Yes / No / Maybe", False),
        ("TCP/IP / UDP / QUIC", False),
        ("Home / Docs / API", False),  # a slash list reads the same as `Yes / No / Maybe`
        ("if a > b > c:", False),
        ("x | y | z", False),
        ("> > Quoted reply", False),
        ("Build -> Test -> Deploy", False),
        ("Posted by Ann \u00b7 3 min read \u00b7 Jan 5", False),
    ],
)
def test_boilerplate_lines(line: str, boilerplate: bool) -> None:
    assert cleaning.is_boilerplate_line(line) is boilerplate


def test_tables_and_code_blocks_in_documents_are_kept() -> None:
    document = "\n".join(
        [
            "Home | About | Contact",
            "Menu | Price | Notes",
            "--- | --- | ---",
            "Soup | 4 | Hot",
            "```text",
            "Home | Docs | API",
            "Skip to content",
            "```",
            "Body text.",
        ]
    )
    kept, removed = cleaning.strip_lines(document, set())
    assert (kept, removed) == (document.split("\n", 1)[1], 1)


def test_repeated_code_lines_are_not_boilerplate() -> None:
    files = [f"def f{i}():\n    return None\n}}\nvalue = {i}\nCopyright Example Corp." for i in range(5)]
    repeated = cleaning.repeated_lines(files, min_docs=3, min_fraction=0.3)
    assert repeated == {"Copyright Example Corp."}
    assert cleaning.strip_lines(files[0], repeated) == ("def f0():\n    return None\n}\nvalue = 0", 1)


def test_boilerplate_is_stripped_from_documents_only(tmp_path: Path) -> None:
    """An answer or instruction that looks like a menu is what the user wants learned."""
    menu_answer = f"{NAV}\nSkip to content\n{COOKIE}"
    records = [
        {
            "instruction": f"Print the site menu.\n{NAV}",
            "input": f"{NAV}\n{_article(i)}",
            "output": menu_answer,
        }
        for i in range(3)
    ]
    path = write_jsonl(records, tmp_path / "d.jsonl")
    clean = clean_and_split(Dataset(source=str(path), split=Split(validation=0.0, test=0.0)), S3Store())
    assert clean.report.boilerplate_lines_removed == 3
    assert {e.messages[0][1] for e in clean.train} == {
        f"Print the site menu.\n{NAV}\n\n{_article(i)}" for i in range(3)
    }
    assert {e.messages[1][1] for e in clean.train} == {menu_answer}


def _article(i: int) -> str:
    words = random.Random(i).choices(WORDS, k=40)
    return f"Article {i}: " + " ".join(words) + "."


def planted_corpus(tmp_path: Path) -> tuple[Path, Path]:
    """20 unique docs + 3 exact duplicates + 2 near duplicates, each with nav, cookie and footer lines,
    and a test file sharing one exact and one near-duplicate example with training."""
    records = []
    for i in range(20):
        body = f"{_article(i)} It took days and people to finish."
        records.append({"text": f"{NAV}\n{body}\n{COOKIE}\n{FOOTER}"})
    records += [dict(records[1]), dict(records[2]), dict(records[3])]  # exact
    near = records[4]["text"].replace("finish", "complete")
    records.append({"text": near})
    records.append({"text": records[5]["text"].replace("days", "whole days")})
    test = [
        {"text": records[6]["text"]},  # exact copy of a training document
        {"text": records[7]["text"].replace("people", "persons")},  # near copy
        {"text": "A wholly different held-out document about orbit mechanics and the moon."},
    ]
    return write_jsonl(records, tmp_path / "train.jsonl"), write_jsonl(test, tmp_path / "test.jsonl")


def test_report_counts_match_what_was_planted(tmp_path: Path) -> None:
    train, test = planted_corpus(tmp_path)
    ds = Dataset(source=str(train), test_source=str(test), format="text")
    clean = clean_and_split(ds, S3Store())
    report = clean.report
    assert report.raw == 28
    # 25 train docs x 3 lines (nav, cookie, footer) + 2 test docs with them
    assert report.boilerplate_lines_removed == 27 * 3
    assert report.duplicates_removed == 3 + 1  # planted copies + the training copy of a test doc
    assert report.near_duplicates_removed == 2 + 1
    assert report.examples == 20 - 2 + 3
    assert len(clean.test) == 3
    texts = [e.text or "" for e in clean.train + clean.validation]
    assert not any(NAV in t or COOKIE in t or FOOTER in t for t in texts)


def test_no_test_example_leaks_into_training(tmp_path: Path) -> None:
    train, test = planted_corpus(tmp_path)
    clean = clean_and_split(Dataset(source=str(train), test_source=str(test), format="text"), S3Store())
    index = cleaning.NearDuplicateIndex(threshold=0.8)
    for example in clean.test:
        index.add(example.dedupe_text())
    assert not any(index.contains_near(e.dedupe_text()) for e in clean.train + clean.validation)


def test_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = write_jsonl(synthetic_dataset(200, seed=3), tmp_path / "d.jsonl")
    ds = Dataset(source=str(path), split={"validation": 0.1, "test": 0.1, "seed": 7})
    first, second = clean_and_split(ds, S3Store()), clean_and_split(ds, S3Store())
    assert [e.messages for e in first.test] == [e.messages for e in second.test]
    assert (len(first.train), len(first.validation), len(first.test)) == (160, 20, 20)
    train_keys = {e.messages for e in first.train}
    assert not train_keys & {e.messages for e in first.test + first.validation}
    other = clean_and_split(
        ds.model_copy(update={"split": ds.split.model_copy(update={"seed": 8})}), S3Store()
    )
    assert [e.messages for e in other.test] != [e.messages for e in first.test]


def test_repeated_instruction_lines_are_kept(tmp_path: Path) -> None:
    """The same instruction in every example is the task, not boilerplate."""
    path = write_jsonl(synthetic_dataset(50, seed=1), tmp_path / "d.jsonl")
    clean = clean_and_split(Dataset(source=str(path)), S3Store())
    assert clean.report.boilerplate_lines_removed == 0
    assert all(QUESTION in e.messages[0][1] for e in clean.train)
