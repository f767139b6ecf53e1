"""Cleaning never damages an example: real code, YAML, Markdown and aligned tables survive byte for byte."""

from __future__ import annotations

import colorsys
import importlib.metadata
import importlib.resources
import inspect
import re
import textwrap
from pathlib import Path

import pytest

from finetune_trainer.config import Dataset, S3Store, Split
from finetune_trainer.data import cleaning
from finetune_trainer.data.pipeline import clean_and_split
from finetune_trainer.testing.tiny import write_jsonl

NO_HOLDOUT = Split(validation=0.0, test=0.0)


def _nested_list(markdown: str) -> str:
    """The first Markdown list that has nested items."""
    lines = markdown.split("\n")
    nested = next(i for i, line in enumerate(lines) if line.startswith("  - "))
    start = end = nested
    while start and lines[start - 1].startswith(("- ", "  - ")):
        start -= 1
    while end < len(lines) and lines[end].startswith(("- ", "  - ")):
        end += 1
    return "\n".join(lines[start:end])


def _readme(package: str) -> str:
    """The Markdown long description in an installed package's METADATA (after the headers)."""
    metadata = importlib.metadata.distribution(package).read_text("METADATA") or ""
    return metadata.split("\n\n", 1)[1]


def real_texts() -> dict[str, str]:
    """Text that ships with Python and with the trainer's own dependencies, not written for this test."""
    yaml = importlib.resources.files("datasets.utils") / "resources" / "readme_structure.yaml"
    texts = {
        "indented method": inspect.getsource(textwrap.TextWrapper._wrap_chunks),
        "module with two blank lines between functions": inspect.getsource(colorsys),
        "aligned plain-text table": re.__doc__ or "",
        "yaml": yaml.read_text(encoding="utf-8"),
        "nested markdown list": _nested_list(_readme("datasets")),
        "markdown readme with tables and code": _readme("datasets"),
    }
    # Trailing whitespace is the one thing normalization may remove.
    return {name: "\n".join(line.rstrip() for line in t.split("\n")).strip("\n") for name, t in texts.items()}


def test_the_fixtures_hold_what_they_are_for() -> None:
    texts = real_texts()
    assert texts["indented method"].startswith("    def _wrap_chunks")
    assert re.search(r"\n\n\n\S", texts["module with two blank lines between functions"])
    assert re.search(r'\n    "\."      Matches', texts["aligned plain-text table"])
    assert "\n    allow_empty: false" in texts["yaml"]
    assert "\n  - [" in texts["nested markdown list"]
    readme = texts["markdown readme with tables and code"]
    assert "\n|---" in readme and "\n```" in readme


@pytest.mark.parametrize("name", sorted(real_texts()))
def test_normalization_keeps_real_text_byte_for_byte(name: str) -> None:
    text = real_texts()[name]
    assert cleaning.normalize_text(text) == text


@pytest.mark.parametrize("name", sorted(real_texts()))
def test_boilerplate_removal_keeps_real_documents(name: str) -> None:
    assert cleaning.strip_lines(real_texts()[name], set()) == (real_texts()[name], 0)


def _alpaca(records: list[dict[str, str]], tmp_path: Path) -> dict[str, str]:
    """Cleaned user message -> answer, for every example."""
    path = write_jsonl(records, tmp_path / "d.jsonl")
    clean = clean_and_split(Dataset(source=str(path), split=NO_HOLDOUT), S3Store())
    assert clean.report.boilerplate_lines_removed == 0
    return {e.messages[0][1]: e.messages[1][1] for e in clean.train}


def test_real_text_survives_the_pipeline_as_an_answer(tmp_path: Path) -> None:
    texts = real_texts()
    got = _alpaca([{"instruction": f"Show {name}.", "output": t} for name, t in texts.items()], tmp_path)
    assert got == {f"Show {name}.": text for name, text in texts.items()}


def test_real_text_survives_the_pipeline_as_a_document(tmp_path: Path) -> None:
    """`input` is a document field: boilerplate is stripped there, and none of this is boilerplate."""
    texts = real_texts()
    records = [{"instruction": "Summarize.", "input": t, "output": name} for name, t in texts.items()]
    got = _alpaca(records, tmp_path)
    assert got == {f"Summarize.\n\n{text}": name for name, text in texts.items()}


def test_real_documents_survive_the_text_format(tmp_path: Path) -> None:
    texts = real_texts()
    path = write_jsonl([{"text": t} for t in texts.values()], tmp_path / "d.jsonl")
    clean = clean_and_split(Dataset(source=str(path), format="text", split=NO_HOLDOUT), S3Store())
    assert sorted(e.text or "" for e in clean.train) == sorted(texts.values())
