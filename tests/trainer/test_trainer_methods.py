"""Method mechanics: DeepSpeed config generation, LoRA and QLoRA wrapping on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_trainer.config import DeepSpeed, Hyperparameters, Method, ModelSource
from finetune_trainer.methods.deepspeed import zero_config
from finetune_trainer.methods.loading import Precision, choose_precision, load_for_training


def test_zero2_config_from_the_spec() -> None:
    hp = Hyperparameters(batch_size=4, gradient_accumulation=8)
    config = zero_config(DeepSpeed(enabled=True, stage=2, offload="optimizer"), hp, bf16=True)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 8
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in config["zero_optimization"]


def test_zero3_with_parameter_offload() -> None:
    config = zero_config(
        DeepSpeed(enabled=True, stage=3, offload="optimizer+params"), Hyperparameters(), False
    )
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_zero_config_without_a_gpu_needs_no_compiled_deepspeed_op() -> None:
    hp = Hyperparameters()
    config = zero_config(DeepSpeed(enabled=True, stage=2, offload="optimizer"), hp, False, cuda=False)
    assert "optimizer" not in config  # the Trainer's torch AdamW, not DeepSpeed's compiled Adam
    assert "offload_optimizer" not in config["zero_optimization"]
    assert "optimizer" not in zero_config(DeepSpeed(enabled=True, stage=2), hp, True, cuda=True)


# One DeepSpeed engine with the generated config and the Trainer's kind of optimizer (torch AdamW),
# one training step. On CPU the engine runs as it would on a GPU node, offload included.
OFFLOAD_STEP = """
import os, socket, sys
import torch

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
import deepspeed
from finetune_trainer.config import DeepSpeed, Hyperparameters
from finetune_trainer.methods.deepspeed import zero_config

ds = DeepSpeed(enabled=True, stage=int(sys.argv[1]), offload=sys.argv[2])
config = zero_config(ds, Hyperparameters(batch_size=2, gradient_accumulation=1), False, cuda=True)
config["gradient_clipping"] = 1.0  # what the Trainer fills in for "auto"
config["zero_optimization"] |= {"reduce_bucket_size": 1e6, "overlap_comm": False}
config["zero_optimization"].pop("stage3_prefetch_bucket_size", None)
config["zero_optimization"].pop("stage3_param_persistence_threshold", None)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
deepspeed.init_distributed("gloo")
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
loss = engine(torch.randn(2, 8)).pow(2).mean()
engine.backward(loss)
engine.step()
print("stepped with", type(engine.optimizer).__name__)
"""


@pytest.mark.parametrize(("stage", "offload"), [(2, "optimizer"), (3, "optimizer"), (3, "optimizer+params")])
def test_deepspeed_starts_with_offload_and_the_trainers_optimizer(stage: int, offload: str) -> None:
    """DeepSpeed refuses ZeRO-Offload with a torch optimizer unless the config allows it."""
    proc = subprocess.run(
        [sys.executable, "-c", OFFLOAD_STEP, str(stage), offload],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0 and "stepped with DeepSpeedZeroOptimizer" in proc.stdout, proc.stderr[-3000:]


def test_zero_config_follows_the_precision() -> None:
    hp = Hyperparameters()
    fp16 = zero_config(DeepSpeed(enabled=True, stage=2), hp, False, cuda=True, fp16=True)
    assert fp16["bf16"] == {"enabled": False}
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0}  # 0: dynamic loss scaling
    assert zero_config(DeepSpeed(enabled=True), hp, True)["fp16"]["enabled"] is False


@pytest.mark.parametrize(
    ("cuda", "bf16_supported", "method", "compute_dtype", "expected"),
    [
        (False, False, "qlora", "bfloat16", Precision(bf16=False, fp16=False, quantized_compute="float32")),
        (False, False, "lora", "bfloat16", Precision(bf16=False, fp16=False, quantized_compute="")),
        (False, False, "full", "bfloat16", Precision(bf16=False, fp16=False, quantized_compute="")),
        (True, True, "qlora", "bfloat16", Precision(bf16=True, fp16=False, quantized_compute="bfloat16")),
        (True, False, "qlora", "bfloat16", Precision(bf16=False, fp16=True, quantized_compute="float16")),
        (True, True, "qlora", "float16", Precision(bf16=False, fp16=True, quantized_compute="float16")),
        (True, False, "qlora", "float16", Precision(bf16=False, fp16=True, quantized_compute="float16")),
        (True, True, "qlora", "float32", Precision(bf16=False, fp16=False, quantized_compute="float32")),
        (True, True, "lora", "bfloat16", Precision(bf16=True, fp16=False, quantized_compute="")),
        (True, True, "full", "float16", Precision(bf16=True, fp16=False, quantized_compute="")),
        (True, False, "lora", "bfloat16", Precision(bf16=False, fp16=False, quantized_compute="")),
        (True, False, "full", "bfloat16", Precision(bf16=False, fp16=False, quantized_compute="")),
    ],
)
def test_precision_by_device_and_method(
    cuda: bool, bf16_supported: bool, method: str, compute_dtype: str, expected: Precision
) -> None:
    got = choose_precision(
        cuda=cuda, bf16_supported=bf16_supported, method=method, compute_dtype=compute_dtype
    )
    assert got == expected
    assert not (got.bf16 and got.fp16)


def _step(model: torch.nn.Module) -> tuple[float, float]:
    ids = torch.randint(10, 200, (2, 16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_lora_trains_only_the_adapter(tiny_model: Path) -> None:
    model = load_for_training(
        str(tiny_model), ModelSource(source=str(tiny_model)), Method(type="lora"), False
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    first, last = _step(model)
    assert last < first


def test_qlora_runs_4bit_forward_backward_on_cpu(tiny_model: Path) -> None:
    """bitsandbytes' CPU backend quantizes to NF4 and trains the adapter on top."""
    import bitsandbytes as bnb

    method = Method.model_validate({"type": "qlora", "quantization": {"computeDtype": "float32"}})
    model = load_for_training(str(tiny_model), ModelSource(source=str(tiny_model)), method, False)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    first, last = _step(model)
    assert last < first


def _adapter_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_qlora_gradients_after_an_evaluation_are_those_before_it(tiny_model: Path) -> None:
    """The baseline evaluation runs the 4-bit layers in eval mode first; training afterwards must
    still backpropagate through them (bitsandbytes' CPU eval kernel has no backward)."""
    method = Method.model_validate({"type": "qlora", "quantization": {"computeDtype": "float32"}})
    model = load_for_training(str(tiny_model), ModelSource(source=str(tiny_model)), method, False)
    ids = torch.randint(10, 200, (2, 16))
    with torch.no_grad():  # one step's worth of adapter, so that B is not zero and grads reach A
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    model.train()
    before = _adapter_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = _adapter_grads(model, ids)
    assert before.keys() == after.keys() and len(before) > 4
    for name, grad in before.items():
        assert torch.allclose(grad, after[name], rtol=1e-3, atol=1e-6), name
