"""Faults injected into a real trainer run, for tests of what happens when training goes wrong.

`inject("loss", 8)` makes the loss of training step 8 NaN; `inject("weight", 8)` fills a trained
weight with NaN after step 8. A test calls it before `finetune_trainer.__main__.main`, either in a
wrapper script or from a `sitecustomize.py` on the trainer pod's PYTHONPATH (end-to-end tests).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer import train

KINDS = ("loss", "weight")


class Fault(TrainerCallback):
    def __init__(self, kind: str, step: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"fault kind {kind!r}: use one of {', '.join(KINDS)}")
        self.kind, self.step = kind, step

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        def nan_loss(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
            if self.kind == "loss" and module.training and state.global_step + 1 == self.step:
                output.loss = output.loss * float("nan")
            return output

        assert model is not None
        model.register_forward_hook(nan_loss, prepend=True)  # before the trainer's own hooks

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if self.kind == "weight" and state.global_step == self.step and model is not None:
            with torch.no_grad():  # after the step's own divergence check
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))


def inject(kind: str, step: int) -> None:
    """Every Trainer the run builds from now on carries the fault."""
    build = train.build_trainer

    def build_with_fault(*args: Any, **kwargs: Any) -> Any:
        trainer = build(*args, **kwargs)
        trainer.add_callback(Fault(kind, step))
        return trainer

    train.build_trainer = build_with_fault
