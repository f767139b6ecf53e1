"""Load the base model and tokenizer, and wrap the model for the configured method."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer.config import Method, ModelSource, S3Store

log = logging.getLogger(__name__)


class MethodError(Exception):
    """The method cannot run here (missing library or device); the message says how to fix it."""


def resolve_model_path(model: ModelSource, store: S3Store, cache_dir: Path) -> str:
    """A local folder or hub id that `from_pretrained` can read."""
    source = model.source
    if source.startswith("s3://"):
        from finetune_trainer.data.errors import DataError
        from finetune_trainer.data.sources import download_s3

        target = cache_dir / "base-model"
        target.mkdir(parents=True, exist_ok=True)
        done = target / ".downloaded"
        with _exclusive(cache_dir / "base-model.lock"):  # the pod's other ranks wait, then reuse it
            if not done.is_file():
                try:
                    download_s3(source.rstrip("/") + "/", store, target, field="model.source")
                except DataError as exc:  # no such model: a configuration error, not a data one
                    raise MethodError(str(exc)) from None
                done.write_text(source)
        return str(target)
    if source.startswith("hf://"):
        return source.removeprefix("hf://")
    if not Path(source).exists():
        raise MethodError(
            f"model.source: {source!r} does not exist (fix: a local folder, s3://… or hf://org/name)"
        )
    return source


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_tokenizer(path: str, revision: str | None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, revision=revision)


def _dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, "auto")


@dataclass(frozen=True)
class Precision:
    """How training computes: TrainingArguments' and DeepSpeed's bf16/fp16, and QLoRA's 4-bit layers."""

    bf16: bool  # autocast to bfloat16
    fp16: bool  # autocast to float16 with dynamic loss scaling
    quantized_compute: str  # the dtype QLoRA's 4-bit layers compute in; "" for lora and full


def choose_precision(*, cuda: bool, bf16_supported: bool, method: str, compute_dtype: str) -> Precision:
    """On CPU everything computes in float32. QLoRA follows method.quantization.computeDtype, but a GPU
    without bfloat16 computes in float16, whose small range needs loss scaling (its trainable weights
    are float32 adapters). LoRA and full fine-tuning autocast to bfloat16 where the GPU has it, else
    compute in the weights' dtype: loss scaling cannot unscale the gradients of half-precision weights."""
    if not cuda:
        return Precision(bf16=False, fp16=False, quantized_compute="float32" if method == "qlora" else "")
    if method != "qlora":
        return Precision(bf16=bf16_supported, fp16=False, quantized_compute="")
    compute = "float16" if compute_dtype == "bfloat16" and not bf16_supported else compute_dtype
    return Precision(bf16=compute == "bfloat16", fp16=compute == "float16", quantized_compute=compute)


def device_precision(method: Method) -> Precision:
    import torch

    cuda = bool(torch.cuda.is_available())
    return choose_precision(
        cuda=cuda,
        bf16_supported=cuda and bool(torch.cuda.is_bf16_supported()),
        method=method.type,
        compute_dtype=method.quantization.compute_dtype,
    )


def _quantization(method: Method) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    q = method.quantization
    if not torch.cuda.is_available():
        # bitsandbytes >= 0.45 has a CPU backend for 4-bit layers; fail clearly if it is missing.
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise MethodError(
                f"method.type: 'qlora' needs bitsandbytes, which cannot load here ({exc}) "
                "(fix: run on a GPU node, install bitsandbytes>=0.45, or use method.type: lora)"
            ) from None
    chosen = device_precision(method).quantized_compute
    if chosen != q.compute_dtype and torch.cuda.is_available():
        log.warning(
            "method.quantization.computeDtype: %r is not supported by this GPU: computing in %s "
            "with loss scaling",
            q.compute_dtype,
            chosen,
        )
    compute = _dtype(chosen)
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def load_model(path: str, model: ModelSource, method: Method) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"revision": model.revision, "dtype": _dtype(model.dtype)}
    if method.type == "qlora":
        kwargs["quantization_config"] = _quantization(method)
        # Each rank its own 4-bit copy on its own GPU: "auto" would split one copy across the pod's GPUs.
        kwargs["device_map"] = {"": _current_gpu()} if _cuda() else "cpu"
    loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    loaded.config.use_cache = False  # the cache would disable packed-sequence masks in training
    return loaded


def _current_gpu() -> int:
    import torch

    return int(torch.cuda.current_device())


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def wrap_for_method(model: Any, method: Method, gradient_checkpointing: bool) -> Any:
    if method.type == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method.type == "qlora":
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=gradient_checkpointing
        )
        keep_cpu_4bit_layers_trainable(model)
    lora = method.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(model, config)
    trainable, total = wrapped.get_nb_trainable_parameters()
    log.info("%s adapter: %d trainable of %d parameters", method.type, trainable, total)
    return wrapped


def keep_cpu_4bit_layers_trainable(model: Any) -> int:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight for a faster kernel the
    first time it runs in eval mode (the baseline evaluation) and never unpacks it when training
    resumes; that kernel has no backward, so gradients through every 4-bit layer come out wrong and
    the adapter learns noise. Training keeps the unpacked layout. Returns the layers changed."""
    from bitsandbytes.nn.modules import Linear4bit

    changed = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_for_training(path: str, model: ModelSource, method: Method, gradient_checkpointing: bool) -> Any:
    return wrap_for_method(load_model(path, model, method), method, gradient_checkpointing)
