"""Completes the saved final artifact: merged weights when requested, then the model card."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer import artifacts, evaluation
from finetune_trainer.checkpoints.manifest import read_json
from finetune_trainer.config import TrainerConfig
from finetune_trainer.model_card import MERGED_DIR, README, CardFacts, render_model_card
from finetune_trainer.redact import redact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeOutcome:
    requested: bool
    saved: bool = False
    error: str = ""

    @property
    def message(self) -> str:
        """For the job's status message; empty when no merge was requested."""
        if self.saved:
            return f"merged weights saved under final/{MERGED_DIR}/"
        if self.error:
            return (
                f"output.mergeAdapter: merging the adapter into the base model failed ({self.error}); "
                "final/ holds the adapter, which loads onto the base model with peft (fix: see the trainer "
                "log; when memory ran out, give the pod more or merge offline with peft's merge_and_unload)"
            )
        return ""


def merge_if_requested(config: TrainerConfig, folder: Path, processor: Any, base_path: str) -> MergeOutcome:
    """A failed merge leaves the adapter in `folder` as it was: the run still stores and reports it."""
    if not config.output.merge_adapter or config.method.type == "full":
        return MergeOutcome(requested=False)
    from finetune_trainer.methods.merge import merge_adapter

    target = folder / MERGED_DIR
    try:
        merge_adapter(folder, base_path, config, target)
        processor.save_pretrained(target)  # the tokenizer carries the chat template it was trained with
        for sidecar in (artifacts.TEMPLATE_FILE, artifacts.CONFIG_FILE):
            if (folder / sidecar).is_file():
                shutil.copy2(folder / sidecar, target / sidecar)
    except Exception as exc:  # the adapter is already saved; a merge problem must not lose it
        log.exception("merging the adapter failed; the final artifact keeps the adapter only")
        shutil.rmtree(target, ignore_errors=True)
        return MergeOutcome(requested=True, error=redact(f"{type(exc).__name__}: {exc}")[:300])
    return MergeOutcome(requested=True, saved=True)


def final_location(config: TrainerConfig) -> str:
    store = config.checkpoints.store
    if not store.bucket:
        return ""
    from finetune_trainer.checkpoints.layout import JobLocation, uri

    job = config.job
    return uri(
        store.bucket, JobLocation(store.bucket, store.prefix, job.namespace, job.name, job.uid).final_key
    )


def write_model_card(
    config: TrainerConfig,
    folder: Path,
    metrics: Mapping[str, Mapping[str, float]],
    merge: MergeOutcome,
) -> Path:
    """README.md at the artifact's root, from the sidecars saved next to the weights."""
    baseline, final = metrics.get("baseline", {}), metrics.get("final", {})
    template = folder / artifacts.TEMPLATE_FILE
    facts = CardFacts(
        config=config,
        baseline=baseline,
        final=final,
        criteria=evaluation.check_criteria(config.goal.success_criteria, baseline, final),
        data_report=read_json(folder / artifacts.DATA_REPORT_FILE),
        environment=read_json(folder / artifacts.ENVIRONMENT_FILE),
        template=template.read_text(encoding="utf-8") if template.is_file() else "",
        merged=merge.saved,
        merge_error=merge.error,
        location=final_location(config),
    )
    path = folder / README
    path.write_text(redact(render_model_card(facts)), encoding="utf-8")
    return path


def complete(
    config: TrainerConfig,
    folder: Path,
    processor: Any,
    base_path: str,
    metrics: Mapping[str, Mapping[str, float]],
) -> MergeOutcome:
    merge = merge_if_requested(config, folder, processor, base_path)
    write_model_card(config, folder, metrics, merge)
    return merge
