"""DeepSpeed ZeRO configuration generated from the job spec (deepspeed itself is imported lazily)."""

from __future__ import annotations

from typing import Any

from finetune_trainer.config import DeepSpeed, Hyperparameters


def zero_config(
    ds: DeepSpeed, hp: Hyperparameters, bf16: bool, cuda: bool = True, fp16: bool = False
) -> dict[str, Any]:
    """A ZeRO-2/3 config for transformers' Trainer; "auto" values are filled in by the Trainer.

    There is no "optimizer" section, so the Trainer builds a torch optimizer: DeepSpeed's own
    optimizers are compiled on first use (minutes per pod). With offload, that torch AdamW steps
    the fp32 master weights in CPU memory (slower than DeepSpeed's CPU Adam, but it starts
    anywhere). Without a GPU, offload is dropped:
    everything already lives in CPU memory, and offload would require DeepSpeed's compiled CPU Adam.
    """
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": cuda,  # overlaps on CUDA streams; nothing to overlap on CPU
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    offload = ds.offload if cuda else "none"
    if offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation,
        "gradient_clipping": "auto",
        "bf16": {"enabled": bf16},
        # TrainingArguments must agree (transformers checks); loss_scale 0: dynamic loss scaling
        "fp16": {"enabled": fp16, "loss_scale": 0},
        "zero_optimization": zero,
    }
    if "offload_optimizer" in zero:
        # DeepSpeed refuses offload with the Trainer's torch AdamW unless told otherwise; its own
        # CPU Adam would be faster but is compiled on first use, which the runtime image cannot.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None
