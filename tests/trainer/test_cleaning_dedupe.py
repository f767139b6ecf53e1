"""Near duplicates compare what varies: a shared system prompt or instruction makes no duplicates."""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
from pathlib import Path
from typing import Any, Literal

import pytest

from finetune_trainer.config import Dataset, Preprocessing, S3Store, Split
from finetune_trainer.data import cleaning
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.pipeline import CleanData, check_duplicate_share, clean_and_split
from finetune_trainer.testing.tiny import write_jsonl

NO_HOLDOUT = Split(validation=0.0, test=0.0)
MODULES = (  # noqa: SIM905 - reads better as prose
    "argparse asyncio base64 bisect calendar codecs collections configparser contextlib copy csv dataclasses "
    "datetime decimal difflib email.message enum fnmatch fractions ftplib functools gettext glob gzip "
    "hashlib heapq hmac html.parser http.client imaplib inspect io ipaddress itertools json locale logging "
    "mailbox mimetypes operator os pathlib pickle platform poplib pprint queue random re sched secrets "
    "selectors shlex shutil smtplib socket sqlite3 ssl statistics string struct subprocess tarfile tempfile "
    "textwrap threading timeit tokenize traceback unittest urllib.request uuid warnings weakref "
    "xml.etree.ElementTree zipfile zlib"
).split()


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def _jaccard(a: set[tuple[str, ...]], b: set[tuple[str, ...]]) -> float:
    return len(a & b) / len(a | b)


@functools.cache
def _docstrings() -> dict[str, str]:
    """First paragraphs of stdlib docstrings (classes, functions, methods) of 12 words or more."""
    found: dict[str, str] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            members = [obj, *vars(obj).values()] if inspect.isclass(obj) else [obj]
            for member in members:
                if inspect.isfunction(member) or inspect.isclass(member):
                    paragraph = " ".join((inspect.getdoc(member) or "").split("\n\n")[0].split())
                    if len(paragraph.split()) >= 12:
                        found.setdefault(f"{name}.{member.__qualname__}", paragraph)
    return found


def unrelated_answers(n: int) -> dict[str, str]:
    """`n` real docstring paragraphs, no two sharing as much as a third of their word 3-grams."""
    chosen: dict[str, str] = {}
    shingles: list[set[tuple[str, ...]]] = []
    for name, text in _docstrings().items():
        own = _shingles(text)
        if all(_jaccard(own, other) < 0.33 for other in shingles):
            chosen[name] = text
            shingles.append(own)
        if len(chosen) == n:
            return chosen
    raise AssertionError(f"only {len(chosen)} unrelated docstrings found, {n} needed")


SYSTEM_PROMPT = inspect.getdoc(argparse) or ""


def _sharegpt(question: str, answer: str) -> dict[str, Any]:
    turns = [("system", SYSTEM_PROMPT), ("human", question), ("gpt", answer)]
    return {"conversations": [{"from": who, "value": text} for who, text in turns]}


def _clean(
    records: list[dict[str, Any]],
    tmp_path: Path,
    fmt: Literal["alpaca", "sharegpt"] = "sharegpt",
    pre: Preprocessing | None = None,
) -> CleanData:
    path = write_jsonl(records, tmp_path / "train.jsonl")
    ds = Dataset(source=str(path), format=fmt, split=NO_HOLDOUT, preprocessing=pre or Preprocessing())
    return clean_and_split(ds, S3Store())


def test_the_shared_prompt_dominates_each_example() -> None:
    """Whole examples would be near duplicates: the data can give the wrong answer."""
    assert len(SYSTEM_PROMPT.split()) >= 200
    answers = list(unrelated_answers(300).values())
    whole = [_shingles(f"{SYSTEM_PROMPT} {a}") for a in answers[:20]]
    assert min(_jaccard(a, b) for a in whole for b in whole if a is not b) > 0.8


def test_unrelated_answers_sharing_a_system_prompt_are_all_kept(tmp_path: Path) -> None:
    answers = unrelated_answers(300)
    clean = _clean([_sharegpt(f"What does {name} do?", a) for name, a in answers.items()], tmp_path)
    assert (clean.report.near_duplicates_removed, clean.report.duplicates_removed) == (0, 0)
    assert clean.report.examples == 300


def test_unrelated_answers_sharing_an_instruction_are_all_kept(tmp_path: Path) -> None:
    answers = unrelated_answers(300)
    records = [{"instruction": SYSTEM_PROMPT, "input": name, "output": a} for name, a in answers.items()]
    clean = _clean(records, tmp_path, fmt="alpaca")
    assert (clean.report.near_duplicates_removed, clean.report.examples) == (0, 300)


def test_planted_duplicates_under_the_shared_prompt_are_still_caught(tmp_path: Path) -> None:
    answers = unrelated_answers(300)
    records = [_sharegpt(f"What does {name} do?", a) for name, a in answers.items()]
    long = [(name, a) for name, a in answers.items() if len(a.split()) >= 40][:10]
    assert len(long) == 10
    near = [_sharegpt(f"What does {name} do?", f"{a} See the documentation.") for name, a in long]
    exact = [dict(record) for record in records[:5]]
    clean = _clean(records + near + exact, tmp_path)
    assert (clean.report.duplicates_removed, clean.report.near_duplicates_removed) == (5, 10)
    assert clean.report.examples == 300


def test_a_test_file_sharing_the_system_prompt_loses_nothing(tmp_path: Path) -> None:
    answers = list(unrelated_answers(300).items())
    train = write_jsonl([_sharegpt(f"What does {n} do?", a) for n, a in answers[:280]], tmp_path / "t.jsonl")
    test = write_jsonl([_sharegpt(f"What does {n} do?", a) for n, a in answers[280:]], tmp_path / "h.jsonl")
    ds = Dataset(source=str(train), test_source=str(test), format="sharegpt", split=NO_HOLDOUT)
    clean = clean_and_split(ds, S3Store())
    assert (len(clean.train), len(clean.test), clean.report.near_duplicates_removed) == (280, 20, 0)


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["prompt\nanswer one"] * 5, set()),  # exact copies count once
        ([f"prompt\n\nanswer {i}" for i in range(5)], {"prompt"}),
        ([f"Prompt  \nanswer {i}" for i in range(5)], {"prompt"}),  # compared as dedupe keys
        ([f"prompt\nanswer {i}" for i in range(4)], set()),  # too few examples to be a template
        ([f"prompt {i % 2}\nanswer {i}" for i in range(10)], {"prompt 0", "prompt 1"}),
    ],
)
def test_template_lines(texts: list[str], expected: set[str]) -> None:
    assert cleaning.template_lines(texts, min_examples=5, min_share=0.1) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("system prompt\nquestion\nanswer", "question\nanswer"),
        ("System  Prompt\nanswer", "answer"),
        ("system prompt\n\n", "system prompt\n\n"),  # nothing varies: the whole text
    ],
)
def test_varying_text(text: str, expected: str) -> None:
    assert cleaning.varying_text(text, frozenset({"system prompt"})) == expected


PRE = Preprocessing(warn_duplicate_share=0.2, max_duplicate_share=0.5)


@pytest.mark.parametrize(
    ("exact", "near", "total", "outcome"),
    [
        (0, 0, 0, "ok"),
        (0, 0, 1000, "ok"),
        (100, 100, 1000, "ok"),  # exactly the warning share
        (100, 101, 1000, "warn"),
        (500, 0, 1000, "warn"),  # exactly the refusal share
        (612, 200, 1000, "refuse"),
    ],
)
def test_duplicate_share(exact: int, near: int, total: int, outcome: str) -> None:
    if outcome == "refuse":
        with pytest.raises(DataError) as refused:
            check_duplicate_share(exact, near, total, PRE, "dataset.source")
        assert str(refused.value).startswith(
            "dataset.source: 812 of 1000 examples (81%) were duplicates or near duplicates "
            "(612 exact, 200 near), above dataset.preprocessing.maxDuplicateShare 0.5 (fix: "
        )
        return
    warnings = check_duplicate_share(exact, near, total, PRE, "dataset.source")
    assert len(warnings) == (outcome == "warn")
    assert all("warnDuplicateShare 0.2" in w for w in warnings)


def test_mostly_duplicated_data_is_refused_and_some_duplication_warned(tmp_path: Path) -> None:
    answers = list(unrelated_answers(100).items())
    records = [_sharegpt(f"What does {n} do?", a) for n, a in answers]
    warned = _clean(records + records[:30], tmp_path)
    assert warned.report.duplicates_removed == 30
    assert any("30 of 130 examples (23%) were duplicates" in w for w in warned.report.warnings)
    with pytest.raises(DataError, match=r"120 of 220 examples \(55%\) .*maxDuplicateShare 0.5 \(fix: "):
        _clean(records * 2 + records[:20], tmp_path / "refused")
