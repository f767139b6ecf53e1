"""The model card (README.md) of the final artifact: what was trained, on what, how, and how well.

`render_model_card` is a pure function of what the run recorded; it reads no environment, so no
secret can reach the card (the config holds Secret names only, never values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from finetune_trainer.config import SuccessCriterion, TrainerConfig
from finetune_trainer.evaluation import CriterionResult

README = "README.md"
MERGED_DIR = "merged"
TEMPLATE_FILE = "prompt_template.jinja"
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class CardFacts:
    """What the card states; every field comes from the run's config, sidecars and results."""

    config: TrainerConfig
    baseline: Mapping[str, float]
    final: Mapping[str, float]
    criteria: Sequence[CriterionResult] = ()
    data_report: Mapping[str, Any] = field(default_factory=dict)
    environment: Mapping[str, Any] = field(default_factory=dict)
    template: str = ""
    merged: bool = False
    merge_error: str = ""
    location: str = ""  # where the final artifact is stored (s3://bucket/key), if anywhere


def render_model_card(facts: CardFacts) -> str:
    from huggingface_hub import ModelCard

    sections = (
        _summary(facts),
        _files(facts),
        _method(facts.config),
        _data(facts.data_report),
        _training(facts.config),
        _evaluation(facts),
        _template(facts.template),
        _versions(facts.environment),
        _usage(facts),
    )
    body = "\n\n".join(s for s in sections if s)
    return str(ModelCard(f"---\n{_metadata(facts).to_yaml()}\n---\n\n{body}\n"))


# --- metadata --------------------------------------------------------------------------------------------


def hub_model_id(source: str) -> str | None:
    return source.removeprefix("hf://") if source.startswith("hf://") else None


def hub_dataset_id(source: str) -> str | None:
    """The trainer reads bare hub ids; local paths and s3:// URIs are not ids."""
    if source.startswith(("s3://", "/", ".")) or PurePosixPath(source).suffix in _DATA_SUFFIXES:
        return None
    return source


def _adapter(config: TrainerConfig) -> bool:
    return config.method.type != "full"


def _task_type(config: TrainerConfig) -> str:
    return "automatic-speech-recognition" if config.dataset.format == "audio" else "text-generation"


def _metadata(facts: CardFacts) -> Any:
    from huggingface_hub import ModelCardData

    config = facts.config
    dataset = hub_dataset_id(config.dataset.source)
    return ModelCardData(
        model_name=f"{config.job.namespace}/{config.job.name}",
        base_model=hub_model_id(config.model.source),
        library_name="peft" if _adapter(config) else "transformers",
        pipeline_tag=_task_type(config),
        tags=["finetune-operator", config.method.type, config.dataset.format],
        datasets=[dataset] if dataset else None,
        eval_results=_eval_results(facts, dataset) or None,
    )


def _finite(values: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(values.items()) if math.isfinite(float(v))}


def _eval_results(facts: CardFacts, dataset: str | None) -> list[Any]:
    """model-index entries: each metric twice, named "(baseline)" and "(final)"."""
    from huggingface_hub import EvalResult

    test = facts.config.dataset.test_source
    name = f"held-out test set ({PurePosixPath(test).name})" if test else "held-out test split"
    results = []
    for stage, values in (("baseline", facts.baseline), ("final", facts.final)):
        for metric, value in _finite(values).items():
            results.append(
                EvalResult(
                    task_type=_task_type(facts.config),
                    dataset_type=dataset or "custom",
                    dataset_name=name,
                    dataset_split="test",
                    metric_type=metric,
                    metric_name=f"{metric} ({stage})",
                    metric_value=value,
                )
            )
    return results


# --- body ------------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _summary(facts: CardFacts) -> str:
    config = facts.config
    job = config.job
    revision = f"`{config.model.revision}`" if config.model.revision else "not pinned"
    lines = [
        f"# {job.namespace}/{job.name}",
        "",
        f"Fine-tuned from `{config.model.source}` (revision {revision}) with {config.method.type} by the "
        f"FineTuneJob `{job.namespace}/{job.name}` (uid `{job.uid or 'unknown'}`).",
    ]
    if config.goal.task:
        lines += ["", f"Task: {config.goal.task}"]
    if facts.location:
        store = config.checkpoints.store
        endpoint = f" at endpoint {store.endpoint}" if store.endpoint else ""
        lines += ["", f"Stored at `{facts.location}`{endpoint}."]
    return "\n".join(lines)


def _files(facts: CardFacts) -> str:
    adapter = _adapter(facts.config)
    weights = (
        "`adapter_model.safetensors`, `adapter_config.json`: the adapter"
        if adapter
        else ("`model*.safetensors`, `config.json`: the whole model")
    )
    rows = [
        f"- {weights}",
        "- the tokenizer, with the chat template it was trained with (also `prompt_template.jinja`)",
        "- `training_config.json` (the full training config), `data_report.json`, `environment.json`",
        "- `metrics.json`: baseline and final metrics on the held-out test set",
    ]
    if facts.merged:
        rows.append(f"- `{MERGED_DIR}/`: the base model with the adapter merged in, loadable without peft")
    if facts.merge_error:
        rows.append(f"- merged weights were requested but not saved: {facts.merge_error}")
    return "## Files\n\n" + "\n".join(rows)


def _method(config: TrainerConfig) -> str:
    method = config.method
    rows: list[tuple[str, object]] = [("Method", method.type)]
    if method.reason:
        rows.append(("Why", method.reason))
    if method.type != "full":
        targets = method.lora.target_modules
        modules = targets if isinstance(targets, str) else ", ".join(targets)
        rows += [("LoRA rank", method.lora.r), ("LoRA alpha", method.lora.alpha)]
        rows += [("LoRA dropout", method.lora.dropout), ("LoRA target modules", modules)]
    if method.type == "qlora":
        q = method.quantization
        double = ", double quantization" if q.double_quant else ""
        rows.append(("Quantization", f"{q.bits}-bit {q.quant_type}{double}, compute {q.compute_dtype}"))
    if method.deepspeed.enabled:
        rows.append(("DeepSpeed", f"ZeRO stage {method.deepspeed.stage}, offload {method.deepspeed.offload}"))
    return "## Method\n\n" + _table(("Setting", "Value"), rows)


_DATA_ROWS = (
    ("raw", "Examples read"),
    ("duplicatesRemoved", "Exact duplicates removed"),
    ("nearDuplicatesRemoved", "Near duplicates removed"),
    ("boilerplateLinesRemoved", "Boilerplate lines removed"),
    ("examples", "Examples after cleaning"),
    ("tokens", "Tokens"),
    ("chunks", "Training sequences"),
    ("truncated", "Examples cut at maxTokens"),
)


def _data(report: Mapping[str, Any]) -> str:
    if not report:
        return ""
    rows: list[tuple[str, object]] = [(label, report[key]) for key, label in _DATA_ROWS if key in report]
    split = report.get("split") or {}
    if split:
        sizes = " / ".join(str(split.get(k, 0)) for k in ("train", "validation", "test"))
        rows.append(("Split train / validation / test", sizes))
    warnings = "".join(f"\n- {w}" for w in report.get("warnings") or [])
    return "## Data\n\n" + _table(("", "Count"), rows) + (f"\n\nWarnings:{warnings}" if warnings else "")


def _training(config: TrainerConfig) -> str:
    hp = config.hyperparameters.model_dump(by_alias=True, exclude_none=True)
    chunking = config.dataset.chunking
    rows = [(name, value) for name, value in hp.items()]
    rows += [("maxTokens", chunking.max_tokens), ("packing", chunking.packing)]
    rows.append(("split seed", config.dataset.split.seed))
    seed = f"Seed {config.hyperparameters.seed} (initialization, shuffling, dropout)."
    return "## Training\n\n" + seed + "\n\n" + _table(("Hyperparameter", "Value"), rows)


def _change(baseline: float | None, final: float | None) -> str:
    return "—" if baseline is None or final is None else f"{final - baseline:+.4g}"


def _evaluation(facts: CardFacts) -> str:
    metrics = sorted(set(facts.baseline) | set(facts.final))
    rows = [
        (
            m,
            _number(facts.baseline.get(m)),
            _number(facts.final.get(m)),
            _change(facts.baseline.get(m), facts.final.get(m)),
        )
        for m in metrics
    ]
    text = "## Evaluation\n\nOn the held-out test set, before (baseline) and after fine-tuning.\n\n"
    text += _table(("Metric", "Baseline", "Final", "Change"), rows) if rows else "No metrics were recorded."
    return text + "\n\n" + _criteria(facts.criteria)


def _rule(c: SuccessCriterion) -> str:
    rules = {
        "maxRegression": c.max_regression,
        "minImprovement": c.min_improvement,
        "atLeast": c.at_least,
        "atMost": c.at_most,
    }
    return next(f"{name} {value:g}" for name, value in rules.items() if value is not None)


def _criteria(results: Sequence[CriterionResult]) -> str:
    if not results:
        return "### Success criteria\n\nNone were declared (`goal.successCriteria`)."
    rows = [
        (
            r.criterion.metric,
            _rule(r.criterion),
            "met" if r.passed else "NOT met",
            r.criterion.on_failure,
            r.reason,
        )
        for r in results
    ]
    return "### Success criteria\n\n" + _table(("Metric", "Rule", "Outcome", "On failure", "Detail"), rows)


def _template(template: str) -> str:
    if not template:
        return ""
    fence = "````" if "```" in template else "```"
    return (
        "## Prompt template\n\nThe model was trained on prompts rendered with this chat template. Deploy it "
        "with the same template (`prompt_template.jinja`, also the tokenizer's `chat_template`); another "
        f"template gives the model prompts it has not learned.\n\n{fence}jinja\n{template}\n{fence}"
    )


def _versions(environment: Mapping[str, Any]) -> str:
    versions = environment.get("versions") or {}
    if not versions:
        return ""
    device = environment.get("device", "unknown")
    gpus = ", ".join(environment.get("gpus") or [])
    where = f"Trained on {device}" + (f" ({gpus})" if gpus else "") + "."
    return (
        "## Library versions\n\n" + where + "\n\n" + _table(("Library", "Version"), sorted(versions.items()))
    )


def _classes(config: TrainerConfig) -> tuple[str, str]:
    if config.dataset.format == "audio":
        return "AutoModelForSpeechSeq2Seq", "AutoProcessor"
    return "AutoModelForCausalLM", "AutoTokenizer"


def _load_code(config: TrainerConfig) -> str:
    auto, processor = _classes(config)
    base = hub_model_id(config.model.source) or config.model.source
    revision = f', revision="{config.model.revision}"' if config.model.revision else ""
    lines = [f"from transformers import {processor}, {auto}", ""]
    if _adapter(config):
        lines[:0] = ["from peft import PeftModel"]
        lines += [
            f'base = {auto}.from_pretrained("{base}"{revision})',
            'model = PeftModel.from_pretrained(base, "path/to/final")',
        ]
    else:
        lines.append(f'model = {auto}.from_pretrained("path/to/final")')
    lines.append(f'{processor.removeprefix("Auto").lower()} = {processor}.from_pretrained("path/to/final")')
    if config.dataset.format != "audio":
        lines += [
            "# prompts through the saved chat template, as in training",
            'messages = [{"role": "user", "content": "..."}]',
            "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
        ]
    return "\n".join(lines)


def _usage(facts: CardFacts) -> str:
    text = f"## How to load\n\n```python\n{_load_code(facts.config)}\n```"
    if facts.merged:
        auto = _classes(facts.config)[0]
        merged = f'model = {auto}.from_pretrained("path/to/final/{MERGED_DIR}")  # no peft needed'
        text += (
            f"\n\nThe merged weights, with the tokenizer and template, need no peft:\n\n```python\n"
            f"from transformers import {auto}\n\n{merged}\n```"
        )
    return text
