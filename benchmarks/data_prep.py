"""Data preparation throughput: cleaning + near-dedup + tokenization + packing on synthetic examples.

Baseline, measured in the same run: the same pipeline with near-duplicate detection off (exact
dedup only), so the ratio is the cost of MinHash near-dedup on top of everything else.

    python benchmarks/data_prep.py [--examples 20000]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe

from finetune_trainer.config import Dataset, S3Store
from finetune_trainer.data.pipeline import clean_and_split, tokenize_splits
from finetune_trainer.testing.tiny import WORDS, build_tiny_tokenizer, write_jsonl

NAV = "Home | Products | About | Contact"


def corpus(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca records with web-like inputs: a shared menu line, and some near duplicates."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
        if i % 10 == 9:  # a near duplicate of the previous record: one word changed
            words = records[-1]["input"].split("\n", 1)[1].replace(rng.choice(WORDS), "amber", 1)
        records.append(
            {"instruction": f"Summarize item {i}.", "input": f"{NAV}\n{words}", "output": words[:40]}
        )
    return records


def prepare(data: Path, tokenizer: object, dedupe: str) -> tuple[float, int]:
    ds = Dataset.model_validate(
        {
            "source": str(data),
            "format": "alpaca",
            "preprocessing": {"dedupe": dedupe},
            "chunking": {"maxTokens": 512, "packing": True},
        }
    )
    start = time.perf_counter()
    prepared = tokenize_splits(clean_and_split(ds, S3Store()), tokenizer, ds, 512)
    return time.perf_counter() - start, prepared.report.examples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=20_000)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        data = write_jsonl(corpus(args.examples), root / "train.jsonl")
        tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(root / "tokenizer"))
        baseline, kept_exact = prepare(data, tokenizer, "exact")
        full, kept_near = prepare(data, tokenizer, "exact+near")
    print(describe())
    print(
        f"examples={args.examples} full: {args.examples / full:,.0f} examples/s ({kept_near} kept), "
        f"near-dedup off: {args.examples / baseline:,.0f} examples/s ({kept_exact} kept)"
    )
    print(f"ratio={full / baseline:.2f} (full pipeline time vs the same pipeline with near-dedup off)")


if __name__ == "__main__":
    main()
