"""One training run from a validated config: prepare data, baseline, train, evaluate, save, decide."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer import artifacts, evaluation
from finetune_trainer.callbacks import (
    CheckpointCallback,
    EvalMetricsCallback,
    PreemptionCallback,
    ProgressCallback,
    PromptsCallback,
    RunState,
    diagnose_model,
)
from finetune_trainer.config import ConfigError, TrainerConfig
from finetune_trainer.data.chunking import PackedCollator
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.pipeline import CleanData, PreparedData, clean_and_split, tokenize_splits
from finetune_trainer.data.tokenization import ensure_template
from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.methods.deepspeed import deepspeed_available, zero_config
from finetune_trainer.methods.loading import (
    MethodError,
    load_for_training,
    load_tokenizer,
    resolve_model_path,
)
from finetune_trainer.report_model import MethodInfo, Phase
from finetune_trainer.reporting import ProgressReporter, TrainerMetrics
from finetune_trainer.runtime import environment_info, set_seeds
from finetune_trainer.sink import CheckpointSink, build_sink

log = logging.getLogger(__name__)
FULL_MIN_EXAMPLES = 1_000
FULL_RECOMMENDED_EXAMPLES = 5_000
SMALL_DATA_EVALS_PER_EPOCH = 2


@dataclass
class Paths:
    out: Path

    @property
    def sidecars(self) -> Path:
        return self.out / "run"

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def final(self) -> Path:
        return self.out / "final"


# --- checks before training ------------------------------------------------------------------------------


def check_small_data(config: TrainerConfig, examples: int) -> list[str]:
    """Refuse full fine-tuning on < 1,000 examples unless allowed; warn below 5,000."""
    if config.method.type != "full":
        return []
    if examples < FULL_MIN_EXAMPLES and not config.method.allow_small_data_full_fine_tune:
        raise DataError(
            f"method.type: 'full' with {examples} examples (< {FULL_MIN_EXAMPLES:,}) is refused: full "
            "fine-tuning overfits this little data (fix: use method.type lora or qlora, add data, or set "
            "method.allowSmallDataFullFineTune: true)"
        )
    if examples < FULL_RECOMMENDED_EXAMPLES:
        return [
            f"full fine-tuning on {examples} examples (< {FULL_RECOMMENDED_EXAMPLES:,}): "
            "LoRA is recommended; evaluating more often"
        ]
    return []


def effective_max_tokens(config: TrainerConfig, context: int | None) -> int:
    chunking = config.dataset.chunking
    if context is None or chunking.max_tokens <= context:
        return chunking.max_tokens
    if "max_tokens" in chunking.model_fields_set:
        raise ConfigError(
            [
                f"dataset.chunking.maxTokens: got {chunking.max_tokens}: above the model's context of "
                f"{context} tokens (fix: set it to {context} or less)"
            ]
        )
    return context


# --- trainer ---------------------------------------------------------------------------------------------


def eval_schedule(config: TrainerConfig, steps_per_epoch: int, examples: int) -> dict[str, Any]:
    hp = config.hyperparameters
    if hp.eval_steps:
        return {"eval_strategy": "steps", "eval_steps": hp.eval_steps}
    if examples < FULL_RECOMMENDED_EXAMPLES and steps_per_epoch >= SMALL_DATA_EVALS_PER_EPOCH:
        return {"eval_strategy": "steps", "eval_steps": steps_per_epoch // SMALL_DATA_EVALS_PER_EPOCH}
    return {"eval_strategy": "epoch"}


def training_arguments(config: TrainerConfig, paths: Paths, data: PreparedData) -> Any:
    import torch
    from transformers import TrainingArguments

    hp = config.hyperparameters
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = max(1, len(data.train) // (hp.batch_size * hp.gradient_accumulation * world))
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() and config.method.type != "qlora"
    schedule = eval_schedule(config, steps_per_epoch, data.report.examples) if data.validation else {}
    ds = config.method.deepspeed
    if ds.enabled and not deepspeed_available():
        raise MethodError(
            "method.deepspeed.enabled: true, but deepspeed is not installed in this image "
            "(fix: use the trainer image with deepspeed, or set method.deepspeed.enabled: false)"
        )
    return TrainingArguments(
        output_dir=str(paths.checkpoints),
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation,
        learning_rate=hp.learning_rate,
        weight_decay=hp.weight_decay,
        warmup_steps=hp.warmup_ratio,
        lr_scheduler_type=hp.lr_scheduler,
        logging_steps=hp.logging_steps,
        save_strategy="steps",
        save_steps=config.checkpoints.every_steps,
        save_total_limit=config.checkpoints.keep,
        seed=hp.seed,
        data_seed=hp.seed,
        bf16=bf16,
        gradient_checkpointing=hp.gradient_checkpointing,
        deepspeed=zero_config(ds, hp, bf16) if ds.enabled else None,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **schedule,
    )


@dataclass
class Session:
    """What a run holds while training."""

    config: TrainerConfig
    paths: Paths
    metrics: TrainerMetrics
    reporter: ProgressReporter
    sink: CheckpointSink
    run: RunState


def build_trainer(s: Session, model: Any, tokenizer: Any, data: PreparedData) -> Any:
    from transformers import Trainer

    args = training_arguments(s.config, s.paths, data)
    hp = s.config.hyperparameters
    mean_chunk = sum(len(f["input_ids"]) for f in data.train) / max(1, len(data.train))
    per_step = hp.batch_size * hp.gradient_accumulation * int(os.environ.get("WORLD_SIZE", "1"))
    callbacks = [
        ProgressCallback(s.metrics, s.reporter, s.run, mean_chunk * per_step, per_step, hp.loss_spike_factor),
        EvalMetricsCallback(s.metrics),
        PromptsCallback(s.config, tokenizer, s.paths.out, s.metrics, s.reporter),
        CheckpointCallback(s.sink, s.paths.sidecars, s.reporter, s.run),
        PreemptionCallback(s.run),
    ]
    return Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation or None,
        data_collator=PackedCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


# --- evaluation ------------------------------------------------------------------------------------------


def evaluate_held_out(s: Session, trainer: Any, tokenizer: Any, data: PreparedData) -> dict[str, float]:
    """Loss and task metrics on the test split (the validation split when there is no test split)."""
    features, examples = (
        (data.test, data.test_examples) if data.test else (data.validation, data.validation_examples)
    )
    results: dict[str, float] = {}
    if features:
        loss = trainer.evaluate(eval_dataset=features, metric_key_prefix="heldout")["heldout_loss"]
        results |= evaluation.loss_metrics(float(loss))
    goal = s.config.goal
    wanted = set(goal.metrics) | {c.metric for c in goal.success_criteria}
    v = s.config.validation
    if wanted & set(evaluation.GENERATION_METRICS):
        results |= evaluation.generation_metrics(
            trainer.model, tokenizer, examples, v.max_generation_samples, v.max_new_tokens
        )
    results |= evaluation.scenario_pass_rate(trainer.model, tokenizer, v.held_out_scenarios, v.max_new_tokens)
    return results


def baseline_metrics(
    s: Session, trainer: Any, tokenizer: Any, data: PreparedData, resume: Path | None
) -> dict[str, float]:
    """First attempt: evaluate the base model. A resumed attempt reuses the stored numbers."""
    for folder in (resume, s.paths.sidecars):
        if folder is not None and (folder / artifacts.BASELINE_FILE).is_file():
            stored: dict[str, float] = json.loads((folder / artifacts.BASELINE_FILE).read_text())
            log.info("reusing the baseline from %s", folder)
            return stored
    if not s.config.goal.held_out_test:
        return {}
    s.reporter.update(phase=Phase.BASELINE)
    baseline = evaluate_held_out(s, trainer, tokenizer, data)
    artifacts.write_json(s.paths.sidecars / artifacts.BASELINE_FILE, baseline)
    s.metrics.set_eval(baseline, "baseline")
    log.info("baseline: %s", json.dumps(baseline, sort_keys=True))
    return baseline


# --- the run ---------------------------------------------------------------------------------------------


def prepare(s: Session) -> tuple[CleanData, list[str]]:
    s.reporter.update(
        phase=Phase.PREPARING, method=MethodInfo(type=s.config.method.type, reason=s.config.method.reason)
    )
    clean = clean_and_split(s.config.dataset, s.config.checkpoints.store)
    warnings = check_small_data(s.config, clean.report.examples)
    for warning in warnings:
        log.warning("%s", warning)
    return clean, warnings


def tokenize(
    s: Session, clean: CleanData, model_path: str, warnings: list[str]
) -> tuple[Any, str, PreparedData]:
    from transformers import AutoConfig

    config = s.config
    tokenizer = load_tokenizer(model_path, config.model.revision)
    own_template = bool(getattr(tokenizer, "chat_template", None))
    template = ensure_template(tokenizer)
    context = getattr(
        AutoConfig.from_pretrained(model_path, revision=config.model.revision),
        "max_position_embeddings",
        None,
    )
    data = tokenize_splits(clean, tokenizer, config.dataset, effective_max_tokens(config, context))
    data.report.template = "tokenizer" if own_template else "default"
    data.report.warnings = warnings
    artifacts.write_sidecars(s.paths.sidecars, config, template, data.report, environment_info())
    s.metrics.set_data(data.report.summary())
    s.reporter.update(data=data.report.summary(), force=True)
    log.info("data: %s", data.report.model_dump_json(by_alias=True))
    return tokenizer, template, data


def decide(s: Session, baseline: dict[str, float], final: dict[str, float]) -> ExitCode:
    results = evaluation.check_criteria(s.config.goal.success_criteria, baseline, final)
    failed = [r for r in results if not r.passed and r.criterion.on_failure == "fail"]
    warned = [r for r in results if not r.passed and r.criterion.on_failure == "warn"]
    for r in results:
        log.info("success criterion %s: %s", "met" if r.passed else "NOT met", r.reason)
    if failed:
        message = "success criteria not met: " + "; ".join(r.reason for r in failed)
        s.reporter.update(phase=Phase.FAILED, final=final, message=message, force=True)
        return ExitCode.SUCCESS_CRITERIA_NOT_MET
    message = "; ".join(f"warning: criterion not met: {r.reason}" for r in warned) or "training succeeded"
    s.reporter.update(phase=Phase.SUCCEEDED, final=final, message=message, force=True)
    return ExitCode.SUCCEEDED


def train(s: Session) -> ExitCode:
    config = s.config
    clean, warnings = prepare(s)
    set_seeds(config.hyperparameters.seed)
    model_path = resolve_model_path(config.model, config.checkpoints.store, s.paths.out)
    tokenizer, _template, data = tokenize(s, clean, model_path, warnings)
    model = load_for_training(
        model_path, config.model, config.method, config.hyperparameters.gradient_checkpointing
    )
    resume = s.sink.restore(s.paths.checkpoints)
    trainer = build_trainer(s, model, tokenizer, data)
    baseline = baseline_metrics(s, trainer, tokenizer, data, resume)
    s.reporter.update(phase=Phase.TRAINING, baseline=baseline, force=True)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if s.run.preempted:
        s.sink.close()
        s.reporter.update(message="preempted: checkpoint saved, resume on retry", force=True)
        return ExitCode.PREEMPTED_CHECKPOINTED
    if s.run.stop_reason:
        s.reporter.update(phase=Phase.FAILED, message=s.run.stop_reason, force=True)
        return ExitCode.FAILED
    return finish(s, trainer, tokenizer, data, baseline)


def finish(
    s: Session, trainer: Any, tokenizer: Any, data: PreparedData, baseline: dict[str, float]
) -> ExitCode:
    s.reporter.update(phase=Phase.EVALUATING, force=True)
    final = evaluate_held_out(s, trainer, tokenizer, data)
    s.metrics.set_eval(final, "final")
    log.info("final: %s", json.dumps(final, sort_keys=True))
    predictions = diagnose_model(s.config, trainer.model, tokenizer, s.paths.out / "prompts", "final")
    s.metrics.set_predictions(predictions)
    s.reporter.update(predictions=predictions)
    folder = artifacts.save_final(
        trainer.model, tokenizer, s.paths.final, s.paths.sidecars, {"baseline": baseline, "final": final}
    )
    info = s.sink.save_final(folder)
    s.sink.close()
    if info is not None:
        s.reporter.update(checkpoint=info)
    return decide(s, baseline, final)


def run(config: TrainerConfig, metrics: TrainerMetrics, reporter: ProgressReporter) -> ExitCode:
    paths = Paths(Path(config.output_dir))
    paths.out.mkdir(parents=True, exist_ok=True)
    session = Session(config, paths, metrics, reporter, build_sink(config), RunState())
    try:
        return train(session)
    finally:
        (paths.out / "metrics.prom").write_bytes(metrics.exposition())
