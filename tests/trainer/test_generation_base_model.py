"""A base model with neither a chat template nor a pad token trains, evaluates and is saved with the
default template."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from transformers import AutoTokenizer

from finetune_trainer.data.formats import DEFAULT_TEMPLATE
from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.testing.cli import base_config, run_trainer
from finetune_trainer.testing.tiny import QUESTION, synthetic_dataset, write_jsonl


def without_pad_token(model: Path, folder: Path) -> Path:
    """A copy of `model` whose tokenizer and configs name no pad token, as many base models ship."""
    shutil.copytree(model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            config.pop("pad_token_id", None)
            path.write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    return folder


def test_a_base_model_without_template_or_pad_token_trains_and_evaluates(
    tiny_model_no_template: Path, tmp_path: Path
) -> None:
    model = without_pad_token(tiny_model_no_template, tmp_path / "base")
    data = write_jsonl(synthetic_dataset(120, seed=3), tmp_path / "train.jsonl")
    config = base_config(
        model,
        data,
        tmp_path / "out",
        "lora",
        goal={
            "metrics": ["eval_loss", "exact_match", "token_f1", "rougeL"],
            "successCriteria": [{"metric": "eval_loss", "maxRegression": 0.0}],
        },
        validation={"maxGenerationSamples": 8, "prompts": [f"{QUESTION}\n\napple river stone"]},
    )
    del config["validation"]["maxNewTokens"]  # derived from the test split's answers
    config["dataset"]["split"] = {"validation": 0.1, "test": 0.1, "seed": 0}

    result = run_trainer(config, tmp_path)

    assert result.code == ExitCode.SUCCEEDED, result.log[-3000:]
    report = result.report()
    for stage in ("baseline", "final"):
        assert {"exact_match", "token_f1", "rougeL"} <= report[stage].keys(), stage
    derived = re.search(r"validation.maxNewTokens unset: generating up to (\d+) new tokens", result.log)
    assert derived, result.log[-3000:]
    answers = AutoTokenizer.from_pretrained(model)(["north", "south"], add_special_tokens=False)["input_ids"]
    assert int(derived.group(1)) == max(len(a) for a in answers) + 1 + 8  # answer, end of turn, margin
    recorded = [
        json.loads(line) for line in (result.out / "prompts" / "final.jsonl").read_text().splitlines()
    ]
    assert [r["prompt"] for r in recorded] == [f"{QUESTION}\n\napple river stone"]

    final = result.out / "final"
    assert (final / "prompt_template.jinja").read_text() == DEFAULT_TEMPLATE
    saved = AutoTokenizer.from_pretrained(final)
    assert saved.chat_template == DEFAULT_TEMPLATE
    assert saved.pad_token == saved.eos_token  # what training padded with


def test_held_out_samples_in_the_status_never_show_a_secret_value(tiny_model: Path, tmp_path: Path) -> None:
    canary = "sb-canary-5f1e0c9a7d2b"  # the trainer's persistence key, pasted into the data by mistake
    records = synthetic_dataset(120, seed=5)
    for record in records:
        record["instruction"] = f"{record['instruction']} (key {canary})"
    data = write_jsonl(records, tmp_path / "train.jsonl")
    config = base_config(
        tiny_model,
        data,
        tmp_path / "out",
        goal={"metrics": ["exact_match"]},
        dataset={"source": str(data), "format": "alpaca", "split": {"validation": 0.1, "test": 0.1}},
    )
    result = run_trainer(config, tmp_path, env={"SUPABASE_SERVICE_ROLE_KEY": canary})
    assert result.code == ExitCode.SUCCEEDED, result.log[-3000:]
    samples = result.report()["samples"]
    # The premise: the samples are the held-out prompts, which carried the key.
    assert len(samples) == 3 and all(s["baseline"] is not None and s["final"] is not None for s in samples)
    assert all("(key ***)" in s["prompt"] for s in samples), samples
    stored = (tmp_path / "out" / "run" / "samples.json").read_text()
    assert canary not in json.dumps(result.report()) and canary not in stored
