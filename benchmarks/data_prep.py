"""Data preparation throughput: load, normalize, strip boilerplate, exact + MinHash near-dedup, split,
tokenize with prompt masking and validation, pack, on a synthetic Alpaca corpus.

Baseline, measured in the same run: the bare fast tokenizer (SmolLM2-135M-Instruct's, with its own
ChatML template; hack/models.py), one
batched `tokenizer(texts)` call on exactly the texts the pipeline tokenizes (every kept example
rendered through the chat template). The ratio is the pipeline's time per example as a multiple of
bare tokenization's.

    python benchmarks/data_prep.py [--examples 100000]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import describe  # type: ignore[import-not-found]

from finetune_trainer.config import Dataset, S3Store
from finetune_trainer.data.pipeline import CleanData, clean_and_split, tokenize_splits
from finetune_trainer.data.tokenization import ensure_template, rendered_text
from finetune_trainer.testing.tiny import WORDS, write_jsonl
from localcluster import models

NAV = "Home | Products | About | Contact"
MAX_TOKENS = 512


def corpus(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca records with web-like inputs: a shared menu line, and some near duplicates."""
    rng = random.Random(seed)
    records: list[dict[str, str]] = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
        if i % 10 == 9:  # a near duplicate of the previous record: one word changed
            words = records[-1]["input"].split("\n", 1)[1].replace(rng.choice(WORDS), "amber", 1)
        records.append(
            {"instruction": f"Summarize item {i}.", "input": f"{NAV}\n{words}", "output": words[:40]}
        )
    return records


def dataset(data: Path) -> Dataset:
    return Dataset.model_validate(
        {
            "source": str(data),
            "format": "alpaca",
            "preprocessing": {"dedupe": "exact+near"},
            "chunking": {"maxTokens": MAX_TOKENS, "packing": True},
        }
    )


def pipeline(ds: Dataset, tokenizer: Any) -> tuple[CleanData, dict[str, float]]:
    """The trainer's two preparation calls, timed apart: the first needs no tokenizer."""
    start = time.perf_counter()
    clean = clean_and_split(ds, S3Store())
    cleaned = time.perf_counter()
    tokenize_splits(clean, tokenizer, ds, MAX_TOKENS)
    stages = {
        "load+clean+dedupe+split": cleaned - start,
        "tokenize+mask+check+pack": time.perf_counter() - cleaned,
    }
    return clean, stages


def bare_tokenizer(clean: CleanData, tokenizer: Any) -> tuple[int, float]:
    """Texts rendered untimed, as the pipeline renders them; then one batched call."""
    examples = [*clean.train, *clean.validation, *clean.test]
    texts = [rendered_text(tokenizer, example) for example in examples]
    start = time.perf_counter()
    tokenizer(texts, add_special_tokens=False)
    return len(texts), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=100_000, help="synthetic examples in the corpus")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        data = write_jsonl(corpus(args.examples), root / "train.jsonl")
        tokenizer = AutoTokenizer.from_pretrained(models.ensure(models.SMOLLM2))
        ensure_template(tokenizer)
        clean, stages = pipeline(dataset(data), tokenizer)
        texts, bare = bare_tokenizer(clean, tokenizer)
    full = sum(stages.values())
    ours, baseline = args.examples / full, texts / bare
    print(describe())
    print(
        f"examples={args.examples} ({texts} kept): pipeline {ours:,.0f} examples/s in {full:.1f} s "
        f"({', '.join(f'{name} {secs:.1f} s' for name, secs in stages.items())}); "
        f"bare tokenizer {baseline:,.0f} texts/s in {bare:.2f} s"
    )
    print(
        f"ratio={baseline / ours:.1f} (pipeline time per example vs one batched fast-tokenizer call on the "
        "rendered texts it tokenizes)"
    )


if __name__ == "__main__":
    main()
