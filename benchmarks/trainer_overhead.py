"""Training throughput of the product's trainer against a bare transformers Trainer + peft.

Both fine-tune SmolLM2-135M-Instruct (hack/models.py) with the same LoRA adapter on the same
examples (the quickstart's Unicode-name task), for the same optimizer steps, batch size and
sequence lengths, on CPU. The product runs as a pod would (`python -m finetune_trainer` with its
callbacks, progress reports and metrics); checkpoints, evaluation and the baseline are off, so
what is compared is the training loop. Each side's time is transformers' own `train_runtime`.

    python benchmarks/trainer_overhead.py [--steps 30] [--rounds 1]

ratio = product tokens/s / bare tokens/s (target >= 0.9).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from machine import describe  # type: ignore[import-not-found]

from finetune_trainer.testing import unicode_names
from finetune_trainer.testing.tiny import write_jsonl
from localcluster import models

BATCH, LEARNING_RATE, MAX_TOKENS, SEED = 8, 1e-3, 128, 42
RUNTIME = re.compile(r"\{[^{}]*'train_runtime'[^{}]*\}")
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "JOB_ID": "bench"}


def product_config(model: Path, data: Path, out: Path, steps: int) -> dict[str, Any]:
    return {
        "job": {"namespace": "bench", "name": "overhead", "uid": "bench"},
        "goal": {"metrics": ["eval_loss"], "heldOutTest": False},
        "model": {"source": str(model)},
        "dataset": {
            "source": str(data),
            "format": "alpaca",
            "preprocessing": {"dedupe": "none"},
            "chunking": {"maxTokens": MAX_TOKENS, "packing": False},
            "split": {"validation": 0.0, "test": 0.0},
        },
        "method": {"type": "lora", "reason": "benchmark"},
        "hyperparameters": {
            "maxSteps": steps,
            "batchSize": BATCH,
            "learningRate": LEARNING_RATE,
            "loggingSteps": 5,
            "seed": SEED,
        },
        "checkpoints": {"everySteps": steps * 10, "verifyRestore": False},
        "validation": {"everyEpoch": False},
        "report": {"file": str(out / "progress.json")},
        "metricsPort": 0,
        "metricsLingerSeconds": 0,
        "outputDir": str(out),
    }


def train_runtime(log: str) -> float:
    found = RUNTIME.findall(log)
    if not found:
        raise SystemExit(f"no train_runtime in the log:\n{log[-3000:]}")
    return float(ast.literal_eval(found[-1])["train_runtime"])


def run_product(model: Path, data: Path, tmp: Path, steps: int) -> float:
    out = tmp / "product"
    out.mkdir(parents=True, exist_ok=True)
    config = tmp / "product.json"
    config.write_text(json.dumps(product_config(model, data, out, steps)))
    argv = [sys.executable, "-m", "finetune_trainer", "--config", str(config)]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **ENV}, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the product's trainer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return train_runtime(proc.stdout + proc.stderr)


BARE = """
import json, sys
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                          TrainingArguments)

model_path, data_path, out, steps, batch, lr, max_tokens, seed = sys.argv[1:9]
tokenizer = AutoTokenizer.from_pretrained(model_path)
records = [json.loads(line) for line in open(data_path)]

def encode(r):
    chat = [{"role": "system", "content": r["system"]}, {"role": "user", "content": r["instruction"]}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    answer = [{"role": "assistant", "content": r["output"]}]
    full = tokenizer.apply_chat_template(chat + answer, tokenize=False)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][: int(max_tokens)]
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return {"input_ids": ids, "labels": [-100] * n + ids[n:]}

train = Dataset.from_list([encode(r) for r in records])
model = AutoModelForCausalLM.from_pretrained(model_path)
model.config.use_cache = False
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                         target_modules="all-linear", task_type="CAUSAL_LM"))
args = TrainingArguments(output_dir=out, max_steps=int(steps), per_device_train_batch_size=int(batch),
                         learning_rate=float(lr), warmup_steps=0.03, lr_scheduler_type="cosine",
                         logging_steps=5, save_strategy="no", seed=int(seed), data_seed=int(seed),
                         report_to="none", disable_tqdm=True, dataloader_num_workers=0)
collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
Trainer(model=model, args=args, train_dataset=train, data_collator=collator).train()
"""


def run_bare(model: Path, data: Path, tmp: Path, steps: int) -> float:
    argv = [sys.executable, "-c", BARE, str(model), str(data), str(tmp / "bare"), str(steps)]
    argv += [str(BATCH), str(LEARNING_RATE), str(MAX_TOKENS), str(SEED)]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **ENV}, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the bare Trainer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return train_runtime(proc.stdout + proc.stderr)


def tokens_per_step(model: Path) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = []
    for r in unicode_names.records():
        chat = [
            {"role": "system", "content": r["system"]},
            {"role": "user", "content": r["instruction"]},
            {"role": "assistant", "content": r["output"]},
        ]
        lengths.append(len(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]))
    return statistics.mean(lengths) * BATCH


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    parser.add_argument("--rounds", type=int, default=1, help="product/bare pairs; the median is shown")
    args = parser.parse_args()
    print(describe())
    model = models.ensure(models.SMOLLM2)
    per_step = tokens_per_step(model)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = write_jsonl(unicode_names.records(), tmp / "data.jsonl")
        for round_ in range(args.rounds):
            product = run_product(model, data, tmp / f"r{round_}", args.steps)
            bare = run_bare(model, data, tmp / f"r{round_}", args.steps)
            tokens = per_step * args.steps
            print(
                f"round {round_ + 1}: product {tokens / product:.0f} tokens/s ({product:.1f}s), "
                f"bare {tokens / bare:.0f} tokens/s ({bare:.1f}s)"
            )
            ratios.append(bare / product)
    print(f"ratio={statistics.median(ratios):.2f} (product tokens/s vs bare transformers Trainer + peft)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
