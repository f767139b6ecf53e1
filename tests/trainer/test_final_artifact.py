"""The final artifact: merged weights on request (LoRA, QLoRA) and the model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard

from finetune_trainer import evaluation, final_artifact
from finetune_trainer.config import ModelSource, TrainerConfig
from finetune_trainer.methods.loading import load_for_training, load_tokenizer
from finetune_trainer.model_card import CardFacts, render_model_card
from finetune_trainer.testing.tiny import CHATML_TEMPLATE

IDS = torch.tensor([[5, 40, 77, 123, 250, 9, 31, 400, 18, 64, 2, 300]])


def trainer_config(model: Path, method: dict[str, Any], **changes: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": {"namespace": "team-a", "name": "support-bot", "uid": "uid-7"},
            "model": {"source": str(model)},
            "dataset": {"source": "/data/tickets.jsonl"},
            "method": method,
            "output": {"mergeAdapter": True, "maxShardSize": "200KB"},
            **changes,
        }
    )


def trained_adapter(model: Path, config: TrainerConfig, folder: Path) -> Any:
    """The method's wrapped model with a non-zero update (a fresh LoRA B is zero: merging it would
    change nothing, and a test comparing logits could not fail), saved as the adapter artifact."""
    wrapped = load_for_training(str(model), ModelSource(source=str(model)), config.method, False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    wrapped.eval()
    wrapped.save_pretrained(folder)
    (folder / "prompt_template.jinja").write_text(CHATML_TEMPLATE)
    return wrapped


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=IDS).logits.float()
    return out


def load_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(folder)
    return model.eval()


def test_merged_lora_gives_the_logits_of_base_plus_adapter(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    config = trainer_config(tiny_model, {"type": "lora"})
    final = tmp_path / "final"
    live = trained_adapter(tiny_model, config, final)

    outcome = final_artifact.merge_if_requested(
        config, final, load_tokenizer(str(tiny_model), None), str(tiny_model)
    )

    assert outcome.saved and outcome.message == "merged weights saved under final/merged/"
    merged = load_model(final / "merged")  # transformers alone: no peft, no adapter files
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert len(list((final / "merged").glob("model-*.safetensors"))) > 1, "sharded by maxShardSize"
    torch.testing.assert_close(logits(merged), logits(live), rtol=1e-4, atol=1e-4)
    base = load_model(tiny_model)
    assert (logits(merged) - logits(base)).abs().max() > 0.1, "the adapter's update is in the weights"
    assert AutoTokenizer.from_pretrained(final / "merged").chat_template == CHATML_TEMPLATE
    assert (final / "merged" / "prompt_template.jinja").read_text() == CHATML_TEMPLATE


def test_qlora_merges_into_the_unquantized_base(tiny_model: Path, tmp_path: Path) -> None:
    """The 4-bit base cannot hold the update, so the merge starts from the base in the compute
    dtype. Merged logits equal that base plus the adapter (up to float rounding); against the
    trained 4-bit model they differ only by NF4 rounding of the base: close, not equal."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    method = {"type": "qlora", "quantization": {"computeDtype": "float32"}}
    config = trainer_config(tiny_model, method)
    final = tmp_path / "final"
    quantized = trained_adapter(tiny_model, config, final)

    outcome = final_artifact.merge_if_requested(
        config, final, load_tokenizer(str(tiny_model), None), str(tiny_model)
    )

    assert outcome.saved, outcome.error
    merged = load_model(final / "merged")
    saved = json.loads((final / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved and merged.dtype == torch.float32
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), final).eval()
    torch.testing.assert_close(logits(merged), logits(unmerged), rtol=1e-4, atol=1e-4)
    rounding = (logits(merged) - logits(quantized)).abs().mean() / logits(merged).std()
    assert rounding < 0.1, f"NF4 rounding moved the logits by {rounding:.3f} standard deviations"


def test_a_failed_merge_keeps_the_adapter_and_says_why(tiny_model: Path, tmp_path: Path) -> None:
    config = trainer_config(tiny_model, {"type": "lora"})
    final = tmp_path / "final"
    trained_adapter(tiny_model, config, final)
    before = sorted(p.name for p in final.iterdir())

    metrics = {"baseline": {"eval_loss": 3.5}, "final": {"eval_loss": 2.25}}
    tokenizer = load_tokenizer(str(tiny_model), None)
    outcome = final_artifact.complete(config, final, tokenizer, str(tmp_path / "no-base-model-here"), metrics)

    assert outcome.requested and not outcome.saved
    assert sorted(p.name for p in final.iterdir()) == before, "the adapter artifact is untouched"
    assert "output.mergeAdapter: merging the adapter into the base model failed" in outcome.message
    assert "final/ holds the adapter" in outcome.message and "fix:" in outcome.message
    card_text = (final / "README.md").read_text()
    assert "merged weights were requested but not saved" in card_text
    assert "| eval_loss | 3.5 | 2.25 | -1.25 |" in card_text


def test_no_merge_unless_requested(tiny_model: Path, tmp_path: Path) -> None:
    config = trainer_config(tiny_model, {"type": "lora"}, output={})
    final = tmp_path / "final"
    trained_adapter(tiny_model, config, final)
    outcome = final_artifact.merge_if_requested(config, final, None, str(tiny_model))
    assert not outcome.requested and outcome.message == ""
    assert not (final / "merged").exists()


# --- the model card --------------------------------------------------------------------------------------

BASELINE = {"eval_loss": 2.913, "exact_match": 0.02}
FINAL = {"eval_loss": 1.234567, "exact_match": 0.61}
DATA = {
    "raw": 3500,
    "duplicatesRemoved": 300,
    "nearDuplicatesRemoved": 12,
    "examples": 3188,
    "tokens": 1_200_000,
    "split": {"train": 3000, "validation": 94, "test": 94},
}


def card(config: TrainerConfig, **changes: Any) -> str:
    facts: dict[str, Any] = {
        "config": config,
        "baseline": BASELINE,
        "final": FINAL,
        "criteria": evaluation.check_criteria(config.goal.success_criteria, BASELINE, FINAL),
        "data_report": DATA,
        "environment": {"versions": {"torch": "2.9.1", "peft": "0.17.0"}, "device": "cpu"},
        "template": CHATML_TEMPLATE,
        "location": "s3://ckpt/jobs/team-a/support-bot/uid-7/checkpoints/final",
    }
    return render_model_card(CardFacts(**(facts | changes)))


def qlora_config() -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": {"namespace": "team-a", "name": "support-bot", "uid": "uid-7"},
            "model": {"source": "hf://Qwen/Qwen2.5-0.5B", "revision": "7ae5575"},
            "dataset": {"source": "acme/support-tickets"},
            "goal": {
                "task": "answer support tickets",
                "metrics": ["eval_loss", "exact_match"],
                "successCriteria": [
                    {"metric": "eval_loss", "maxRegression": 0.0},
                    {"metric": "exact_match", "atLeast": 0.9, "onFailure": "warn"},
                ],
            },
            "method": {"type": "qlora", "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]}},
            "hyperparameters": {"seed": 1234, "learningRate": 1e-4},
            "checkpoints": {"store": {"endpoint": "https://s3.example.internal", "bucket": "ckpt"}},
        }
    )


def test_card_metadata_holds_base_model_dataset_and_both_metric_sets() -> None:
    data: Any = ModelCard(card(qlora_config())).data
    assert (data.base_model, data.library_name, data.datasets) == (
        "Qwen/Qwen2.5-0.5B",
        "peft",
        ["acme/support-tickets"],
    )
    values = {r.metric_name: r.metric_value for r in data.eval_results}
    assert values == {
        "eval_loss (baseline)": 2.913,
        "exact_match (baseline)": 0.02,
        "eval_loss (final)": 1.234567,
        "exact_match (final)": 0.61,
    }


def test_card_body_states_what_was_trained_how_and_how_well() -> None:
    text = card(qlora_config())
    for fact in (
        "FineTuneJob `team-a/support-bot` (uid `uid-7`)",
        "revision `7ae5575`",
        "| LoRA rank | 8 |",
        "| LoRA alpha | 16 |",
        "| LoRA target modules | q_proj, v_proj |",
        "4-bit nf4, double quantization",
        "| Examples read | 3500 |",
        "| Exact duplicates removed | 300 |",
        "| Split train / validation / test | 3000 / 94 / 94 |",
        "Seed 1234",
        "| eval_loss | 2.913 | 1.235 | -1.678 |",
        "| eval_loss | maxRegression 0 | met | fail |",
        "| exact_match | atLeast 0.9 | NOT met | warn |",
        CHATML_TEMPLATE,
        "Deploy it with the same template",
        "| torch | 2.9.1 |",
        'PeftModel.from_pretrained(base, "path/to/final")',
        "Stored at `s3://ckpt/jobs/team-a/support-bot/uid-7/checkpoints/final` at endpoint "
        "https://s3.example.internal",
    ):
        assert fact in text, fact
    assert "merged/" not in text


def test_card_says_where_merged_weights_are_or_why_they_are_missing() -> None:
    merged = card(qlora_config(), merged=True)
    assert "`merged/`: the base model with the adapter merged in" in merged
    assert 'AutoModelForCausalLM.from_pretrained("path/to/final/merged")' in merged
    failed = card(qlora_config(), merge_error="OutOfMemoryError: CUDA out of memory")
    assert "merged weights were requested but not saved: OutOfMemoryError" in failed


@pytest.mark.parametrize("source", ["s3://data/tickets.jsonl", "/data/tickets.jsonl", "data/train.parquet"])
def test_card_names_a_dataset_only_when_it_is_a_hub_id(source: str) -> None:
    config = qlora_config().model_copy(
        update={"dataset": qlora_config().dataset.model_copy(update={"source": source})}
    )
    data: Any = ModelCard(card(config)).data
    assert data.datasets is None
