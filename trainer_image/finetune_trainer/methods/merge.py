"""Merge a trained LoRA/QLoRA adapter into its base model: weights that load without peft."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from finetune_trainer.config import TrainerConfig

log = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")


def merge_dtype(config: TrainerConfig) -> str:
    """QLoRA's base is 4-bit, which cannot hold the merged update: the merge uses the 16/32-bit
    compute dtype instead. LoRA keeps the dtype the base model was trained in."""
    if config.method.type == "qlora":
        return config.method.quantization.compute_dtype
    return config.model.dtype if config.model.dtype in _DTYPES else "auto"


def _base_class(config: TrainerConfig) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSpeechSeq2Seq

    return AutoModelForSpeechSeq2Seq if config.dataset.format == "audio" else AutoModelForCausalLM


def merge_adapter(adapter_dir: Path, base_path: str, config: TrainerConfig, target: Path) -> Path:
    """Load the base unquantized on CPU (the training copy may sit on the GPU), apply the saved
    adapter, merge it with peft's `merge_and_unload`, and save safetensors shards to `target`."""
    from peft import PeftModel

    dtype = merge_dtype(config)
    base = _base_class(config).from_pretrained(base_path, revision=config.model.revision, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(target, max_shard_size=config.output.max_shard_size)
    log.info("merged the adapter into the base model (%s): %s", dtype, target)
    return target
