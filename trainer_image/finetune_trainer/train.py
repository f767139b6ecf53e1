"""One training run from a validated config: prepare data, baseline, train, evaluate, save, decide."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from finetune_trainer import artifacts, distributed, evaluation, final_artifact, speech, termination
from finetune_trainer.callbacks import (
    CheckpointCallback,
    DivergenceCallback,
    EvalMetricsCallback,
    PreemptionCallback,
    ProgressCallback,
    PromptsCallback,
    RunState,
    diagnose_model,
)
from finetune_trainer.config import ConfigError, TrainerConfig
from finetune_trainer.data.audio import load_audio, tokenize_audio
from finetune_trainer.data.chunking import PackedCollator
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.formats import Example
from finetune_trainer.data.pipeline import CleanData, PreparedData, clean_and_split, tokenize_splits
from finetune_trainer.data.report import DataReport
from finetune_trainer.data.tokenization import ensure_template
from finetune_trainer.distributed import Rendezvous
from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.methods.deepspeed import deepspeed_available, zero_config
from finetune_trainer.methods.loading import (
    MethodError,
    device_precision,
    load_for_training,
    load_tokenizer,
    resolve_model_path,
)
from finetune_trainer.redact import redact
from finetune_trainer.report_model import MethodInfo, Phase, Predictions, Ranks, Sample
from finetune_trainer.reporting import ProgressReporter, TrainerMetrics
from finetune_trainer.runtime import environment_info, set_seeds
from finetune_trainer.sink import CheckpointRestoreError, CheckpointSink, LocalSink, build_sink

log = logging.getLogger(__name__)
FULL_MIN_EXAMPLES = 1_000
FULL_RECOMMENDED_EXAMPLES = 5_000
SMALL_DATA_EVALS_PER_EPOCH = 2
SAMPLES_FILE = "samples.json"


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


def deepspeed_arguments(config: TrainerConfig) -> dict[str, Any]:
    """TrainingArguments for DeepSpeed; the process group is already joined (`distributed.join`)."""
    import torch

    ds = config.method.deepspeed
    if not ds.enabled:
        return {}
    if not deepspeed_available():
        raise MethodError(
            "method.deepspeed.enabled: true, but deepspeed is not installed in this image "
            "(fix: use the trainer image with deepspeed, or set method.deepspeed.enabled: false)"
        )
    cuda = torch.cuda.is_available()
    if not cuda and ds.offload != "none":
        log.info("method.deepspeed.offload %r ignored: without a GPU everything is in CPU memory", ds.offload)
    p = device_precision(config.method)
    return {
        "deepspeed": zero_config(ds, config.hyperparameters, p.bf16, cuda, fp16=p.fp16),
        "accelerator_config": {"use_configured_state": True},
    }


def training_arguments(config: TrainerConfig, paths: Paths, work: Workload, world: int = 1) -> Any:
    from transformers import TrainingArguments

    hp = config.hyperparameters
    steps_per_epoch = max(1, len(work.train) // (hp.batch_size * hp.gradient_accumulation * world))
    schedule = eval_schedule(config, steps_per_epoch, work.examples) if work.validation else {}
    p = device_precision(config.method)
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
        bf16=p.bf16,
        fp16=p.fp16,
        logging_nan_inf_filter=False,  # a NaN loss is logged and reported as NaN, not hidden as the mean
        gradient_checkpointing=hp.gradient_checkpointing,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **schedule,
        **deepspeed_arguments(config),
        **data_parallel_arguments(config, world),
    )


def data_parallel_arguments(config: TrainerConfig, world: int) -> dict[str, Any]:
    """LoRA and QLoRA on several processes: DDP on the process group `distributed.join` started."""
    if config.method.deepspeed.enabled or world == 1:
        return {}
    return {"accelerator_config": {"use_configured_state": True}, "average_tokens_across_devices": False}


def evaluation_trainer(config: TrainerConfig, paths: Paths, work: Workload) -> Any:
    """A plain Trainer (no DeepSpeed, one process) that evaluates the model as the training
    Trainer would: same batch size, collator and loss."""
    from transformers import Trainer, TrainingArguments

    p = device_precision(config.method)
    args = TrainingArguments(
        output_dir=str(paths.out / "evaluation"),
        per_device_eval_batch_size=config.hyperparameters.batch_size,
        bf16=p.bf16,
        fp16=p.fp16,
        logging_nan_inf_filter=False,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return Trainer(model=work.model, args=args, data_collator=work.collator, processing_class=work.processor)


@dataclass
class Workload:
    """What differs between text and speech fine-tuning."""

    model: Any
    processor: Any  # the tokenizer, or a speech processor; saved with checkpoints and the artifact
    train: Sequence[Any]
    validation: Sequence[Any]
    examples: int
    tokens_per_example: float
    collator: Any
    evaluate: Callable[[Any], dict[str, float]]  # held-out metrics of the trainer's model
    chat: bool  # the job's validation prompts apply (a text model)
    max_new_tokens: int  # validation.maxNewTokens, or derived from the held-out references


@dataclass
class Session:
    """What a run holds while training."""

    config: TrainerConfig
    paths: Paths
    metrics: TrainerMetrics
    reporter: ProgressReporter
    sink: CheckpointSink
    run: RunState
    rendezvous: Rendezvous = distributed.SINGLE
    base_model_path: str = ""  # the resolved base model, which merged weights start from
    answers: list[evaluation.Answered] = field(default_factory=list)  # of the latest evaluation


def build_trainer(s: Session, work: Workload) -> Any:
    from transformers import Trainer

    world = s.rendezvous.world_size
    args = training_arguments(s.config, s.paths, work, world)
    hp = s.config.hyperparameters
    per_step = hp.batch_size * hp.gradient_accumulation * world
    live = live_fingerprint_matches(s.config, s.sink)
    callbacks = [
        ProgressCallback(
            s.metrics, s.reporter, s.run, work.tokens_per_example * per_step, per_step, hp.loss_spike_factor
        ),
        EvalMetricsCallback(s.metrics),
        DivergenceCallback(s.run),  # before the checkpoint and SIGTERM callbacks: it can cancel the save
        CheckpointCallback(s.sink, s.paths.sidecars, s.reporter, s.run, live),
        PreemptionCallback(s.run),
    ]
    if work.chat:
        callbacks.append(
            PromptsCallback(s.config, work.processor, s.paths.out, s.metrics, s.reporter, work.max_new_tokens)
        )
    return Trainer(
        model=work.model,
        args=args,
        train_dataset=work.train,
        eval_dataset=work.validation or None,
        data_collator=work.collator,
        processing_class=work.processor,
        callbacks=callbacks,
    )


def live_fingerprint_matches(config: TrainerConfig, sink: CheckpointSink) -> bool:
    """Whether the live model's fingerprint can be compared with the restore check's reload.

    The check reloads a causal language model on CPU, unsharded, in the dtype it was saved in.
    QLoRA's training preparation upcasts the base's unquantized layers, DeepSpeed partitions or
    wraps the model, GPU numerics differ from CPU ones, and speech models have no fingerprint:
    there the sink records the fingerprint of the saved folder loaded like the check loads it,
    which proves the stored bytes load and round-trip, but not that they hold the live model.
    The device is checked at each save (the Trainer moves the model after this point).
    """
    if isinstance(sink, LocalSink) or not config.checkpoints.verify_restore:
        return False
    if config.dataset.format == "audio" or config.method.deepspeed.enabled:
        return False
    return config.method.type != "qlora"


# --- evaluation ------------------------------------------------------------------------------------------


def held_out(data: PreparedData) -> tuple[list[dict[str, list[int]]], list[Example]]:
    """The test split's features and examples; the validation split's when there is no test split."""
    return (data.test, data.test_examples) if data.test else (data.validation, data.validation_examples)


def text_max_new_tokens(config: TrainerConfig, tokenizer: Any, data: PreparedData) -> int:
    configured = config.validation.max_new_tokens
    lengths = [] if configured is not None else evaluation.answer_tokens(tokenizer, held_out(data)[1])
    chosen = evaluation.derived_max_new_tokens(configured, lengths)
    if configured is None:
        log.info(
            "validation.maxNewTokens unset: generating up to %d new tokens (longest held-out answer: "
            "%s tokens, cap %d)",
            chosen,
            max(lengths) if lengths else "none",
            evaluation.MAX_NEW_TOKENS_CAP,
        )
    return chosen


def evaluate_held_out(
    s: Session, trainer: Any, *, tokenizer: Any, data: PreparedData, max_new_tokens: int
) -> dict[str, float]:
    """Loss and task metrics on the test split (the validation split when there is no test split)."""
    features, examples = held_out(data)
    results: dict[str, float] = {}
    s.answers = []  # this evaluation's, never an earlier one's
    if features:  # across every rank of a multi-process run: each evaluates a share
        loss = trainer.evaluate(eval_dataset=features, metric_key_prefix="heldout")["heldout_loss"]
        results |= evaluation.loss_metrics(float(loss))
    if not s.rendezvous.is_main and not evaluation.sharded(trainer.model):
        return results  # rank 0 generates alone with its whole copy of the weights
    goal = s.config.goal
    wanted = set(goal.metrics) | {c.metric for c in goal.success_criteria}
    v, batch = s.config.validation, s.config.hyperparameters.batch_size
    if wanted & set(evaluation.GENERATION_METRICS):
        s.answers = evaluation.answer_examples(
            trainer.model, tokenizer, examples, v.max_generation_samples, max_new_tokens, batch
        )
        results |= evaluation.score_answers(s.answers)
    results |= evaluation.scenario_pass_rate(
        trainer.model, tokenizer, v.held_out_scenarios, max_new_tokens, batch
    )
    return results


def baseline_metrics(s: Session, trainer: Any, work: Workload, resume: Path | None) -> dict[str, float]:
    """First attempt: evaluate the base model. A resumed attempt reuses the stored numbers."""
    for folder in (resume, s.paths.sidecars):
        if folder is not None and (folder / artifacts.BASELINE_FILE).is_file():
            stored: dict[str, float] = json.loads((folder / artifacts.BASELINE_FILE).read_text())
            log.info("reusing the baseline from %s", folder)
            s.metrics.set_eval(stored, "baseline")  # dashboards draw the baseline line again
            reuse_samples(s, folder)
            return stored
    if not s.config.goal.held_out_test:
        return {}
    s.reporter.update(phase=Phase.BASELINE)
    baseline = work.evaluate(trainer)
    publish_samples(s, "baseline")
    artifacts.write_json(s.paths.sidecars / artifacts.BASELINE_FILE, baseline)
    s.metrics.set_eval(baseline, "baseline")
    log.info("baseline: %s", json.dumps(baseline, sort_keys=True))
    return baseline


def publish_samples(s: Session, phase: str) -> None:
    """The first held-out answers of this phase in the status (and the samples sidecar, which every
    checkpoint carries, so a resumed run shows the base model's answers too)."""
    if not s.answers or not s.rendezvous.is_main:
        return
    redacted = [
        replace(a, prompt=redact(a.prompt), reference=redact(a.reference), output=redact(a.output))
        for a in s.answers[: evaluation.SAMPLE_COUNT]
    ]
    samples = evaluation.merge_samples(s.reporter.report.samples, redacted, phase)
    artifacts.write_json(s.paths.sidecars / SAMPLES_FILE, [x.model_dump() for x in samples])
    s.reporter.update(samples=samples, force=True)


def reuse_samples(s: Session, folder: Path) -> None:
    stored = folder / SAMPLES_FILE
    if stored.is_file():
        samples = [Sample.model_validate(x) for x in json.loads(stored.read_text())]
        artifacts.write_json(s.paths.sidecars / SAMPLES_FILE, [x.model_dump() for x in samples])
        s.reporter.update(samples=samples, force=True)


# --- the run ---------------------------------------------------------------------------------------------


def prepare(
    config: TrainerConfig, reporter: ProgressReporter, r: Rendezvous = distributed.SINGLE
) -> tuple[CleanData | None, list[str]]:
    """Text data is cleaned and split before the model is fetched; speech data needs the model's
    feature extractor first (see speech_workload)."""
    reporter.update(
        phase=Phase.PREPARING,
        method=MethodInfo(type=config.method.type, reason=config.method.reason),
        ranks=Ranks(world_size=r.world_size, per_pod=r.per_pod, pods=r.nodes),
    )
    if config.dataset.format == "audio":
        return None, []
    clean = clean_and_split(config.dataset, config.checkpoints.store)
    warnings = check_small_data(config, clean.report.examples)
    for warning in warnings:
        log.warning("%s", warning)
    return clean, warnings


def tokenize(s: Session, clean: CleanData, model_path: str, warnings: list[str]) -> tuple[Any, PreparedData]:
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
    data.report.warnings = [*warnings, *data.report.warnings]
    publish_data_report(s, data.report, template)
    return tokenizer, data


def publish_data_report(s: Session, report: DataReport, template: str) -> None:
    artifacts.write_sidecars(s.paths.sidecars, s.config, template, report, environment_info())
    s.metrics.set_data(report.summary())
    s.reporter.update(data=report.summary(), force=True)
    for warning in report.warnings:  # in the job's status message, next to the counts
        s.reporter.notice(f"data: {warning}")
    log.info("data: %s", report.model_dump_json(by_alias=True))


def text_workload(s: Session, clean: CleanData, warnings: list[str], model_path: str) -> Workload:
    config = s.config
    tokenizer, data = tokenize(s, clean, model_path, warnings)
    model = load_for_training(
        model_path, config.model, config.method, config.hyperparameters.gradient_checkpointing
    )
    max_new_tokens = text_max_new_tokens(config, tokenizer, data)
    return Workload(
        model=model,
        processor=tokenizer,
        train=data.train,
        validation=data.validation,
        examples=data.report.examples,
        tokens_per_example=sum(len(f["input_ids"]) for f in data.train) / max(1, len(data.train)),
        collator=PackedCollator(tokenizer.pad_token_id),
        evaluate=partial(evaluate_held_out, s, tokenizer=tokenizer, data=data, max_new_tokens=max_new_tokens),
        chat=True,
        max_new_tokens=max_new_tokens,
    )


def speech_workload(s: Session, model_path: str) -> Workload:
    config = s.config
    processor = speech.load_processor(model_path, config.model.revision)
    rate, window = speech.model_window(processor)
    data = load_audio(config.dataset, config.checkpoints.store, rate, window)
    model_config = _model_config(model_path, config)
    max_target = int(getattr(model_config, "max_target_positions", 448))
    tokenize_audio(data, processor.tokenizer, max_target)
    data.report.warnings = check_small_data(config, data.report.examples) + data.report.warnings
    publish_data_report(s, data.report, "")
    collator = speech.SpeechCollator(processor)
    v = config.validation
    clips = data.test or data.validation
    prefix = speech.decoder_prefix(model_config.decoder_start_token_id, processor.tokenizer)
    max_new_tokens = speech.transcript_max_new_tokens(v.max_new_tokens, clips, max_target, len(prefix))
    return Workload(
        model=speech.load_speech_model(model_path, config.model, config.method),
        processor=processor,
        train=data.train,
        validation=data.validation,
        examples=data.report.examples,
        tokens_per_example=data.report.tokens / max(1, data.report.examples),
        collator=collator,
        evaluate=lambda trainer: speech.evaluate_speech(
            trainer, collator, clips, v.max_generation_samples, max_new_tokens
        ),
        chat=False,
        max_new_tokens=max_new_tokens,
    )


def _model_config(model_path: str, config: TrainerConfig) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path, revision=config.model.revision)


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
    notes = [f"warning: criterion not met: {r.reason}" for r in warned]
    notes += [f"criterion met: {r.reason}" for r in results if r.passed]
    message = "; ".join(notes) or "no success criteria set"
    s.reporter.update(phase=Phase.SUCCEEDED, final=final, message=message, force=True)
    return ExitCode.SUCCEEDED


def trainer_and_baseline(s: Session, work: Workload, resume: Path | None) -> tuple[Any, dict[str, float]]:
    """With several processes (or DeepSpeed), rank 0 evaluates the base model on a plain Trainer
    before the process group starts: a ZeRO-2 engine cannot evaluate before training, and the
    numbers mean the same.
    So it does for ZeRO-3: every rank loads the whole model before the engine partitions it, so
    rank 0's baseline needs no more memory than loading did, and the other ranks only wait."""
    if not s.config.method.deepspeed.enabled and not s.rendezvous.multi_process:
        trainer = build_trainer(s, work)
        return trainer, baseline_metrics(s, trainer, work, resume)
    baseline: dict[str, float] = {}
    if s.rendezvous.is_main:
        baseline = baseline_metrics(s, evaluation_trainer(s.config, s.paths, work), work, resume)
    # Without DeepSpeed, several processes train data-parallel (DDP), each with the whole model.
    distributed.join(s.rendezvous, cuda=_cuda(), deepspeed=s.config.method.deepspeed.enabled)
    return build_trainer(s, work), baseline


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def train(s: Session, clean: CleanData | None, warnings: list[str], model_path: str) -> ExitCode:
    work = text_workload(s, clean, warnings, model_path) if clean else speech_workload(s, model_path)
    resume = s.sink.restore(s.paths.checkpoints)  # in a multi-process job: rank 0 chooses
    try:
        trainer, baseline = trainer_and_baseline(s, work, resume)
        resume = restore_on_every_rank(s, resume)
        return train_and_finish(s, trainer, work, baseline, resume)
    finally:
        distributed.leave()


def restore_on_every_rank(s: Session, resume: Path | None) -> Path | None:
    """Once joined, the other ranks restore the checkpoint rank 0 restored: each its own part."""
    if not s.rendezvous.multi_process:
        return resume
    agreed = distributed.share_from_main(s.rendezvous, s.sink.agreement() if s.rendezvous.is_main else {})
    if not s.rendezvous.is_main:
        resume = s.sink.restore_agreed(s.paths.checkpoints, agreed)
    log.info("rank %d resumes from %s", s.rendezvous.rank, resume.name if resume else "the base model")
    return resume


def train_and_finish(
    s: Session, trainer: Any, work: Workload, baseline: dict[str, float], resume: Path | None
) -> ExitCode:
    s.reporter.update(phase=Phase.TRAINING, baseline=baseline, force=True)
    with termination.deferred():  # SIGTERM: a checkpoint at the next step boundary, then exit 75
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if s.run.stop_reason:
            return stop_diverged(s)
        if s.run.preempted:
            return stop_preempted(s)
    termination.stop_if_requested()  # SIGTERM after the last step: no final evaluation
    return finish(s, trainer, work, baseline)


def stop_preempted(s: Session) -> ExitCode:
    close_on_every_rank(s)  # raises if the checkpoint was not committed: no clean preemption then
    step = s.run.checkpoint_steps[-1] if s.run.checkpoint_steps else 0
    rank = s.rendezvous.rank
    log.warning("rank %d stops after SIGTERM: the checkpoint of step %d is stored", rank, step)
    s.reporter.update(message=f"preempted: checkpoint of step {step} saved, resume on retry", force=True)
    return ExitCode.PREEMPTED_CHECKPOINTED


def stop_diverged(s: Session) -> ExitCode:
    """The checkpoints before the divergence are committed; none after it was saved."""
    try:
        s.sink.close()
    except Exception as exc:  # the divergence is what the job's status must say
        log.warning("the last checkpoint before the divergence was not stored: %s", exc)
    s.reporter.update(phase=Phase.FAILED, message=s.run.stop_reason, force=True)
    return ExitCode.DIVERGED


def close_on_every_rank(s: Session) -> None:
    """Each rank stores its part; rank 0 commits once all parts are there. Every rank learns
    whether that worked, so none claims a checkpoint that was not committed."""
    failure: Exception | None = None
    try:
        s.sink.close()
    except Exception as exc:
        failure = exc
    if not distributed.all_ranks_ok(s.rendezvous, failure is None):
        raise failure or CheckpointRestoreError(
            "the checkpoint saved on SIGTERM was not committed: another rank could not store its part "
            "(fix: see rank 0's trainer log; the next run resumes from the previous checkpoint)"
        )


def finish(s: Session, trainer: Any, work: Workload, baseline: dict[str, float]) -> ExitCode:
    s.reporter.update(phase=Phase.EVALUATING, force=True)
    final = work.evaluate(trainer)
    publish_samples(s, "final")
    weights = final_weights(s, trainer)
    predictions = final_predictions(s, trainer, work)
    if not s.rendezvous.is_main:
        s.sink.close()  # rank 0 commits the last checkpoint only with this rank's part
        log.info("rank %d done: rank 0 saves and reports", s.rendezvous.rank)
        return ExitCode.SUCCEEDED
    s.metrics.set_eval(final, "final")
    log.info("final: %s", json.dumps(final, sort_keys=True))
    if predictions is not None:
        s.metrics.set_predictions(predictions)
        s.reporter.update(predictions=predictions)
    folder = artifacts.save_final(
        trainer.model,
        work.processor,
        s.paths.final,
        s.paths.sidecars,
        {"baseline": baseline, "final": final},
        state_dict=weights,
    )
    merge = final_artifact.complete(
        s.config, folder, work.processor, s.base_model_path, {"baseline": baseline, "final": final}
    )
    if merge.message:
        s.reporter.notice(merge.message)
    info = s.sink.save_final(folder)
    s.sink.close()
    if info is not None:
        s.reporter.update(checkpoint=info)
    return decide(s, baseline, final)


def final_predictions(s: Session, trainer: Any, work: Workload) -> Predictions | None:
    """The predictions diagnostic of the trained model, stored and returned on rank 0; on sharded
    weights the other ranks generate along (their result is None)."""
    main = s.rendezvous.is_main
    if not work.chat or not (main or evaluation.sharded(trainer.model)):
        return None
    folder = s.paths.out / "prompts" if main else None
    predictions: Predictions = diagnose_model(
        s.config, trainer.model, work.processor, folder, "final", work.max_new_tokens
    )
    return predictions if main else None


def final_weights(s: Session, trainer: Any) -> dict[str, Any] | None:
    """ZeRO-3 shards the weights: every rank takes part in gathering them, rank 0 receives them.
    Otherwise the model's own weights are complete (None)."""
    ds = s.config.method.deepspeed
    if not ds.enabled or ds.stage != 3:
        return None
    state: dict[str, Any] = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return state


def rank_dir(shared: Path, local_rank: int) -> Path:
    """Each process of a pod keeps its own checkpoints and sidecars, as if it had the pod to itself
    (the protocol in `checkpoints.parts` treats ranks alike); the base model is downloaded once."""
    return shared if local_rank == 0 else shared / f"local-rank-{local_rank}"


def run(
    config: TrainerConfig,
    metrics: TrainerMetrics,
    reporter: ProgressReporter,
    rendezvous: Rendezvous = distributed.SINGLE,
) -> ExitCode:
    shared = Path(config.output_dir)
    paths = Paths(rank_dir(shared, rendezvous.local_rank))
    paths.out.mkdir(parents=True, exist_ok=True)
    try:
        clean, warnings = prepare(config, reporter, rendezvous)  # data errors before any download
        set_seeds(config.hyperparameters.seed)
        model_path = resolve_model_path(config.model, config.checkpoints.store, shared)
        r = rendezvous
        sink = build_sink(config, reporter, model_path, metrics, rank=r.rank, world_size=r.world_size)
        session = Session(config, paths, metrics, reporter, sink, RunState(), rendezvous, model_path)
        return train(session, clean, warnings, model_path)
    finally:
        (paths.out / "metrics.prom").write_bytes(metrics.exposition())
