"""Trainer callbacks: metrics and progress, divergence, prompts each epoch, checkpoints, SIGTERM."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer import distributed, evaluation, termination
from finetune_trainer.config import TrainerConfig
from finetune_trainer.report_model import Phase, Progress
from finetune_trainer.reporting import ProgressReporter, TrainerMetrics
from finetune_trainer.sink import CheckpointSink

log = logging.getLogger(__name__)
DIVERGENCE_WARMUP_LOGS = 3  # early losses swing; judge spikes after a few logs
_STEP_DIR = re.compile(r"checkpoint-(\d+)$")


@dataclass
class RunState:
    """What callbacks learned that decides the exit code."""

    stop_reason: str = ""  # training diverged (exit 6): the job's status message
    preempted: bool = False
    checkpoint_steps: list[int] = field(default_factory=list)

    def diverged(self, message: str) -> None:
        """The first divergence is the one to report: later checks only see its consequences."""
        if not self.stop_reason:
            self.stop_reason = message
            log.error("stopping: %s", message)


def divergence_message(step: int, what: str, learning_rate: float, spike: bool = False) -> str:
    spike_fix = ", raise hyperparameters.lossSpikeFactor" if spike else ""
    return (
        f"training diverged at step {step}: {what} (fix: lower hyperparameters.learningRate from "
        f"{learning_rate:g}, raise hyperparameters.warmupRatio{spike_fix}, or train in bfloat16 rather "
        "than float16 (model.dtype); no checkpoint from this step on is kept)"
    )


def is_training_log(logs: dict[str, Any]) -> bool:
    """A log of the training loop, not of an evaluation (whose metrics all start with eval_)."""
    return not any(key.startswith("eval_") for key in logs)


def stop_before_saving(control: TrainerControl) -> None:
    """After a divergence nothing is saved or evaluated: the weights may no longer be finite."""
    control.should_training_stop = True
    control.should_save = False
    control.should_evaluate = False


class ProgressCallback(TrainerCallback):
    """Training metrics, progress report and loss divergence."""

    def __init__(
        self,
        metrics: TrainerMetrics,
        reporter: ProgressReporter,
        run: RunState,
        tokens_per_step: float,
        samples_per_step: float,
        spike_factor: float,
    ) -> None:
        self.metrics, self.reporter, self.run = metrics, reporter, run
        self.tokens_per_step, self.samples_per_step = tokens_per_step, samples_per_step
        self.spike_factor = spike_factor
        self._start = time.monotonic()
        self._start_step = 0
        self._min_loss = math.inf
        self._logs = 0
        self._last_loss: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._start, self._start_step = time.monotonic(), state.global_step
        self.metrics.labels(self.metrics.total_steps).set(state.max_steps)
        if state.global_step:
            log.info("resuming at step %d of %d", state.global_step, state.max_steps)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Any = None,
        **kw: Any,
    ) -> None:
        logs = logs or {}
        if not is_training_log(logs):
            return  # Trainer.evaluate logs too: the baseline and final evaluations are not training
        m = self.metrics
        elapsed = max(time.monotonic() - self._start, 1e-6)
        steps_per_s = (state.global_step - self._start_step) / elapsed
        m.labels(m.step).set(state.global_step)
        m.labels(m.epoch).set(state.epoch or 0.0)
        m.labels(m.tokens_per_second).set(steps_per_s * self.tokens_per_step)
        m.labels(m.samples_per_second).set(steps_per_s * self.samples_per_step)
        m.set_gpu_usage()
        if "learning_rate" in logs:
            m.labels(m.learning_rate).set(logs["learning_rate"])
        if "loss" in logs:
            m.labels(m.train_loss).set(logs["loss"])
            self._last_loss = round(float(logs["loss"]), 4)
        self._check_divergence(logs, args, state, control)
        remaining = state.max_steps - state.global_step
        progress = Progress(
            step=state.global_step,
            total_steps=state.max_steps,
            epoch=round(state.epoch or 0.0, 3),
            loss=self._last_loss,  # the end-of-training summary carries none: keep the last one
            learning_rate=logs.get("learning_rate"),
            tokens_per_second=round(steps_per_s * self.tokens_per_step, 1),
            eta_seconds=round(remaining / steps_per_s, 1) if steps_per_s > 0 else None,
        )
        if "loss" in logs:  # a step's log line; the end-of-training summary only updates the report
            log.info("progress: %s", progress.model_dump_json(by_alias=True, exclude_none=True))
        self.reporter.update(phase=Phase.TRAINING, progress=progress)

    def _check_divergence(
        self, logs: dict[str, Any], args: TrainingArguments, state: TrainerState, control: TrainerControl
    ) -> None:
        loss, grad_norm = logs.get("loss"), logs.get("grad_norm")
        spike = False
        if loss is not None and not math.isfinite(loss):
            what = f"loss {loss}"
        elif grad_norm is not None and not math.isfinite(grad_norm) and not args.fp16:
            what = f"gradient norm {grad_norm}"  # fp16's loss scaling skips such steps on purpose
        elif loss is None:
            return
        elif self._logs >= DIVERGENCE_WARMUP_LOGS and loss > self.spike_factor * self._min_loss:
            what = f"loss spiked to {loss:.4g}, above {self.spike_factor:g}x its minimum {self._min_loss:.4g}"
            spike = True
        else:
            self._logs += 1
            self._min_loss = min(self._min_loss, loss)
            return
        self.run.diverged(divergence_message(state.global_step, what, args.learning_rate, spike))
        stop_before_saving(control)


class DivergenceCallback(TrainerCallback):
    """Each optimizer step: a training loss that is not finite stops training before anything is
    saved or evaluated. Losses are logged every loggingSteps only, and a checkpoint in between would
    hold the non-finite weights such a loss leaves behind. The raw losses are read from the model's
    forward pass: transformers would replace a NaN by the running mean (`logging_nan_inf_filter`)."""

    def __init__(self, run: RunState) -> None:
        self.run = run
        self._losses: list[Any] = []
        self._hook: Any = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kw: Any,
    ) -> None:
        if model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._observe)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _observe(self, module: Any, inputs: Any, output: Any) -> None:
        loss = getattr(output, "loss", None)
        if module.training and loss is not None:
            self._losses.append(loss.detach())

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        bad, self._losses = first_non_finite(self._losses), []
        if not true_on_any_rank(bad is not None):  # every rank stops at the same step
            return
        what = f"loss {bad}" if bad is not None else "loss not finite on another rank"
        self.run.diverged(divergence_message(state.global_step, what, args.learning_rate))
        stop_before_saving(control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self.run.stop_reason:
            stop_before_saving(control)


def first_non_finite(losses: list[Any]) -> float | None:
    """The first value that is NaN or infinite, else None: one device sync for all micro-batches."""
    if not losses:
        return None
    import torch

    values = torch.cat([loss.float().flatten().to(losses[0].device) for loss in losses])
    bad = ~torch.isfinite(values)
    return float(values[bad][0].item()) if bool(bad.any()) else None


def non_finite_weight(model: Any) -> tuple[str, float] | None:
    """The first trainable weight holding NaN or Inf, with its sum, else None. Sums in float32 make
    no copy of a large weight; a ZeRO-3 weight is checked in this rank's partition (`ds_tensor`)."""
    if model is None:
        return None
    import torch

    named = [(n, getattr(p, "ds_tensor", p)) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return None
    device = named[0][1].device
    sums = torch.stack([t.sum(dtype=torch.float32).to(device) for _, t in named])
    bad = (~torch.isfinite(sums)).nonzero()
    if not len(bad):
        return None
    index = int(bad[0].item())
    return named[index][0], float(sums[index].item())


class EvalMetricsCallback(TrainerCallback):
    def __init__(self, metrics: TrainerMetrics) -> None:
        self.metrics = metrics

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Any = None,
        **kw: Any,
    ) -> None:
        if metrics and "eval_loss" in metrics:
            self.metrics.labels(self.metrics.eval_loss).set(metrics["eval_loss"])
            self.metrics.set_eval(evaluation.loss_metrics(metrics["eval_loss"]), "validation")


class PromptsCallback(TrainerCallback):
    """Each epoch: generate the job's prompts, store them, and run the predictions diagnostic."""

    def __init__(
        self,
        config: TrainerConfig,
        tokenizer: Any,
        out_dir: Path,
        metrics: TrainerMetrics,
        reporter: ProgressReporter,
        max_new_tokens: int,
    ) -> None:
        self.config, self.tokenizer, self.out_dir = config, tokenizer, out_dir
        self.metrics, self.reporter = metrics, reporter
        self.max_new_tokens = max_new_tokens

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kw: Any,
    ) -> None:
        if model is None or not self.config.validation.every_epoch:
            return
        main = state.is_world_process_zero
        if not main and not evaluation.sharded(model):
            return  # rank 0 generates alone with its whole copy of the weights
        predictions = diagnose_model(
            self.config,
            model,
            self.tokenizer,
            self.out_dir / "prompts" if main else None,
            f"epoch-{round(state.epoch or 0)}",
            self.max_new_tokens,
        )
        if main:
            self.metrics.set_predictions(predictions)
            self.reporter.update(predictions=predictions)


def diagnose_model(
    config: TrainerConfig, model: Any, tokenizer: Any, folder: Path | None, name: str, max_new_tokens: int
) -> Any:
    """Generate validation prompts and scenarios, store them as JSONL in `folder` (when given: the
    other ranks of sharded weights only take part in generating), return the diagnostic."""
    v = config.validation
    texts = [*v.prompts, *(s.prompt for s in v.held_out_scenarios)]
    expected: list[str | None] = [None] * len(v.prompts) + [s.expect for s in v.held_out_scenarios]
    if not texts:
        return evaluation.diagnose([], [], [])
    prompts = [evaluation.user_prompt(tokenizer, t) for t in texts]
    outputs = evaluation.generate(
        model, tokenizer, prompts, max_new_tokens, config.hyperparameters.batch_size
    )
    if folder is None:
        return evaluation.diagnose(texts, outputs, expected)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as out:
        for text, output in zip(texts, outputs, strict=True):
            out.write(json.dumps({"prompt": text, "output": output.text, "stopped": output.stopped}) + "\n")
    return evaluation.diagnose(texts, outputs, expected)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


class CheckpointCallback(TrainerCallback):
    """After each save: add sidecar files and hand the folder to the sink. In a multi-process job
    every rank hands over its folder: each stores its own part (see `checkpoints.parts`).

    With `live_fingerprint`, the live model's restore fingerprint is written into the folder first,
    so verification proves the stored files restore the model that was training. Without it the
    sink fingerprints the saved folder by loading it (see `train.live_fingerprint_matches`); so it
    does for a model on a GPU, since the restore check reloads on CPU.
    """

    def __init__(
        self,
        sink: CheckpointSink,
        sidecar_dir: Path,
        reporter: ProgressReporter,
        run: RunState,
        live_fingerprint: bool = False,
    ) -> None:
        self.sink, self.sidecar_dir, self.reporter, self.run = sink, sidecar_dir, reporter, run
        self.live_fingerprint = live_fingerprint

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if self._refuse_non_finite(folder, args, state, control, kw.get("model")):
            return
        self.run.checkpoint_steps.append(state.global_step)
        part_bytes = folder_bytes(folder)
        if folder.is_dir() and state.is_world_process_zero:
            self._hand_over(folder, state, kw.get("model"))
        elif folder.is_dir():
            self.sink.save(folder, state.global_step, {})
            prune_local_checkpoints(folder.parent, args.save_total_limit)
        distributed.patient_barrier(part_bytes)  # rank 0 may be verifying the first checkpoint

    def _refuse_non_finite(
        self, folder: Path, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any
    ) -> bool:
        """A checkpoint with NaN or Inf weights is deleted, never handed to the sink; training stops."""
        bad = non_finite_weight(model)
        if not true_on_any_rank(bad is not None):
            return False
        what = f"weight {bad[0]} sums to {bad[1]}" if bad else "a weight is not finite on another rank"
        self.run.diverged(divergence_message(state.global_step, what, args.learning_rate))
        shutil.rmtree(folder, ignore_errors=True)
        stop_before_saving(control)
        return True

    def _hand_over(self, folder: Path, state: TrainerState, model: Any) -> None:
        if self.run.preempted:
            self.sink.defer_verification()
        for sidecar in self.sidecar_dir.glob("*.j*"):  # json and jinja sidecars
            shutil.copy2(sidecar, folder / sidecar.name)
        if self.live_fingerprint and model is not None and next(model.parameters()).device.type == "cpu":
            from finetune_trainer.checkpoints.fingerprint import write_fingerprint

            write_fingerprint(model, folder)
        info = self.sink.save(folder, state.global_step, _last_metrics(state))
        if info is not None:
            self.reporter.update(checkpoint=info)


def prune_local_checkpoints(output_dir: Path, keep: int | None) -> None:
    """transformers rotates checkpoint folders on rank 0 only; the other ranks' folders hold their
    parts, which their sink has copied for upload, so only the newest `keep` are kept."""
    if not keep:
        return
    folders = sorted(
        (int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := _STEP_DIR.search(p.name))
    )
    for _, old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _last_metrics(state: TrainerState) -> dict[str, float]:
    last = state.log_history[-1] if state.log_history else {}
    return {k: float(v) for k, v in last.items() if isinstance(v, int | float)}


class PreemptionCallback(TrainerCallback):
    """SIGTERM: save a checkpoint at the end of the current step, then stop (exit 75). SIGTERM only
    waits for the step while `termination.deferred()` is on (around `trainer.train`)."""

    def __init__(self, run: RunState) -> None:
        self.run = run

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if true_on_any_rank(termination.requested()) and not self.run.stop_reason:
            self.run.preempted = True
            control.should_save = True
            control.should_training_stop = True


def true_on_any_rank(flag: bool) -> bool:
    """SIGTERM reaches a job's pods at different steps, and a loss is one rank's own, but saving a
    ZeRO checkpoint is collective: every rank stops at the first step any rank asked to. Every rank
    must call it at the same point."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    anywhere = torch.tensor([int(flag)], device=device)
    dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
    return bool(anywhere.item())
