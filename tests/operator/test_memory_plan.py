"""The per-GPU memory plan for full fine-tuning with ZeRO, against DeepSpeed's own estimators of
model-state memory (weights, gradients, optimizer; activations are a separate allowance)."""

from __future__ import annotations

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from finetune_operator import policy
from finetune_operator.api import ResolvedMethodType

TOLERANCE = 0.10  # ours may differ from DeepSpeed's by this share of its number
SIZES = [1.0e9, 7.0e9, 70.0e9]
LAYOUTS = [(1, 1), (1, 8), (2, 8), (4, 8)]  # (nodes, GPUs per node)


def ours(parameters: float, nodes: int, gpus: int, stage: int, offload: str) -> float:
    estimate = policy.estimate_memory(
        ResolvedMethodType.FULL, parameters, ranks=nodes * gpus, deepspeed_stage=stage, offload=offload
    )
    return (estimate.weights + estimate.gradients + estimate.optimizer) * policy.GIB


@pytest.mark.parametrize("parameters", SIZES)
@pytest.mark.parametrize(("nodes", "gpus"), LAYOUTS)
@pytest.mark.parametrize("offload", ["none", "optimizer"])
def test_zero2_plan_matches_deepspeed(parameters: float, nodes: int, gpus: int, offload: str) -> None:
    _, gpu = estimate_zero2_model_states_mem_needs(
        int(parameters), num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload != "none"
    )
    assert ours(parameters, nodes, gpus, 2, offload) == pytest.approx(gpu, rel=TOLERANCE)


@pytest.mark.parametrize("parameters", SIZES)
@pytest.mark.parametrize(("nodes", "gpus"), LAYOUTS)
@pytest.mark.parametrize("offload", ["none", "optimizer", "optimizer+params"])
def test_zero3_plan_matches_deepspeed(parameters: float, nodes: int, gpus: int, offload: str) -> None:
    largest_layer = int(parameters * policy.ZERO3_GATHERED_LAYER_FRACTION)
    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        int(parameters),
        largest_layer,
        num_gpus_per_node=gpus,
        num_nodes=nodes,
        cpu_offload=offload != "none",
        cpu_offload_params=offload == "optimizer+params",
    )
    assert ours(parameters, nodes, gpus, 3, offload) == pytest.approx(gpu, rel=TOLERANCE)


def test_the_message_names_the_ranks_and_the_per_gpu_numbers() -> None:
    estimate = policy.estimate_memory(ResolvedMethodType.FULL, 7e9, ranks=16, deepspeed_stage=2)
    text = estimate.describe()
    assert text.startswith("full fine-tuning with ZeRO-2 over 16 GPUs needs about ")
    assert "GiB per GPU: weights 13.0 + gradients 2.4 + optimizer 4.9" in text, text


@pytest.mark.parametrize("parameters", SIZES)
@pytest.mark.parametrize(("nodes", "gpus"), LAYOUTS)
@pytest.mark.parametrize("offload", ["optimizer", "optimizer+params"])
def test_zero3_offload_host_memory_matches_deepspeed(
    parameters: float, nodes: int, gpus: int, offload: str
) -> None:
    """The pod's memory request holds what ZeRO-3 moves to the CPU (with zero.Init), beyond the
    runtime and the 16-bit copy each process loads."""
    cpu, _, _ = estimate_zero3_model_states_mem_needs(
        int(parameters),
        int(parameters * policy.ZERO3_GATHERED_LAYER_FRACTION),
        num_gpus_per_node=gpus,
        num_nodes=nodes,
        cpu_offload=True,
        cpu_offload_params=offload == "optimizer+params",
        zero_init=True,
    )
    decision = policy.MethodDecision(ResolvedMethodType.FULL, "", 3, parameters=parameters)
    total = policy.host_memory_gib(decision, offload, per_pod=gpus, ranks=nodes * gpus, gpus=gpus)
    loading = gpus * (policy.RUNTIME_GIB_PER_PROCESS + parameters * policy.WEIGHT_BYTES_16BIT / policy.GIB)
    assert (total - loading) * policy.GIB == pytest.approx(cpu, rel=TOLERANCE)
