"""Restore fingerprints: loss and logit statistics of a model on a fixed batch of token ids.

Recorded when a checkpoint is saved and recomputed after it is downloaded and loaded into a
fresh model (a full model folder, or a LoRA/QLoRA adapter folder on top of the base model).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_trainer.checkpoints.manifest import Fingerprint

FINGERPRINT_FILE = "restore_fingerprint.json"
ADAPTER_CONFIG = "adapter_config.json"
BATCH, LENGTH, SEED = 2, 32, 1234


def fixed_batch(vocab_size: int) -> Any:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab_size, (BATCH, LENGTH), generator=generator)


def model_fingerprint(model: Any) -> Fingerprint:
    """Loss and logit statistics on the fixed batch; dropout off, gradients off, mode restored."""
    import torch

    vocab = int(model.get_input_embeddings().num_embeddings)
    device = next(model.parameters()).device
    ids = fixed_batch(vocab).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
    finally:
        model.train(was_training)
    logits = out.logits.float()
    # Magnitudes, not signed means: a relative tolerance needs values well away from zero.
    return {
        "loss": float(out.loss),
        "logitsAbsMean": float(logits.abs().mean()),
        "logitsStd": float(logits.std()),
    }


def write_fingerprint(model: Any, folder: Path) -> Fingerprint:
    """Record the live model's fingerprint in a checkpoint folder before it is handed over."""
    fingerprint = model_fingerprint(model)
    (folder / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
    return fingerprint


def read_fingerprint(folder: Path) -> Fingerprint | None:
    try:
        value = json.loads((folder / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {str(k): float(v) for k, v in value.items()} if isinstance(value, dict) else None


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, "auto")


class RestoreCheck:
    """Load a checkpoint folder into a fresh model and return its fingerprint.

    A folder with `adapter_config.json` is a LoRA/QLoRA adapter: it is loaded onto the base model
    from `base_model` (a folder) or from `load_base()` (e.g. a 4-bit quantized base for QLoRA).
    Any other folder is a full model saved with `save_pretrained`.
    """

    def __init__(
        self,
        base_model: str | Path | None = None,
        load_base: Callable[[], Any] | None = None,
        dtype: str = "auto",
        device: str = "cpu",
    ) -> None:
        self.base_model, self.load_base = base_model, load_base
        self.dtype, self.device = dtype, device

    def __call__(self, folder: Path) -> Fingerprint:
        if _loads_partitioned() and not (folder / ADAPTER_CONFIG).is_file():
            return _fingerprint_in_fresh_process(folder, self.dtype, self.device)
        model = self._load(folder)
        try:
            return model_fingerprint(model)
        finally:
            del model
            gc.collect()

    def _load(self, folder: Path) -> Any:
        from transformers import AutoModelForCausalLM

        if not (folder / ADAPTER_CONFIG).is_file():
            model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=_torch_dtype(self.dtype))
            return model.to(self.device)
        from peft import PeftModel

        return PeftModel.from_pretrained(self._base(), folder, is_trainable=False)

    def _base(self) -> Any:
        from transformers import AutoModelForCausalLM

        if self.load_base is not None:
            return self.load_base()  # placed by its loader (quantized models cannot be moved)
        if self.base_model is None:
            raise ValueError(
                "model.source: a LoRA adapter checkpoint needs its base model to be restored, and none "
                "was given (fix: pass base_model or load_base to RestoreCheck)"
            )
        base: Any = AutoModelForCausalLM.from_pretrained(self.base_model, dtype=_torch_dtype(self.dtype))
        return base.to(self.device)


def _loads_partitioned() -> bool:
    """Whether this process trains with ZeRO-3: transformers then partitions every model it loads
    across the ranks, a collective that ranks busy training never enter (the check would hang)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())  # type: ignore[no-untyped-call]


def _fingerprint_in_fresh_process(folder: Path, dtype: str, device: str) -> Fingerprint:
    code = f"import sys; from {__name__} import print_fingerprint; print_fingerprint(*sys.argv[1:])"
    command = [sys.executable, "-c", code, str(folder), dtype, device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loading {folder} in a fresh process failed: {done.stderr[-2000:]}")
    value = json.loads(done.stdout.strip().splitlines()[-1])
    return {str(k): float(v) for k, v in value.items()}


def print_fingerprint(folder: str, dtype: str, device: str) -> None:
    print(json.dumps(RestoreCheck(dtype=dtype, device=device)(Path(folder))))
