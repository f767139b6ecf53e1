"""The practitioner's checklist as pure functions.

Nothing here talks to the API server: the handlers gather the facts (node labels, which Secret
keys exist, the example count the trainer reported) and pass them in. Every decision comes with
a sentence a user can read, and every refusal says what to change.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from finetune_operator.api import (
    DatasetFormat,
    Environment,
    FineTuneJobSpec,
    MethodType,
    ResolvedMethodType,
)
from finetune_operator.settings import OperatorSettings

# Data-size thresholds for full fine-tuning: below the first it overfits and forgets what the
# base model knew; below the second LoRA usually matches it at a fraction of the cost.
FULL_REFUSED_BELOW_EXAMPLES = 1_000
FULL_DISCOURAGED_BELOW_EXAMPLES = 5_000

# Fewer held-out test examples than this make the baseline comparison mostly noise.
MIN_TEST_EXAMPLES = 50

GIB = 1024**3

# Bytes per parameter, mixed-precision AdamW (ZeRO paper, Rajbhandari et al. 2020): 16-bit weights
# (2) and gradients (2); fp32 master weights, momentum and variance (4 + 4 + 4 = 12).
WEIGHT_BYTES_16BIT = 2.0
GRADIENT_BYTES = 2.0
OPTIMIZER_BYTES = 12.0
# ZeRO-2 also keeps each rank's gradient partition in fp32; ZeRO-3 keeps only that, freeing the
# 16-bit gradient once reduced (DeepSpeed's own estimators count 18 bytes per parameter over the
# ranks for both stages: gradients, fp32 master weights and moments, and for ZeRO-3 the weights).
ZERO2_GRADIENT_BYTES = GRADIENT_BYTES + 4.0
ZERO3_GRADIENT_BYTES = 4.0
# A ZeRO-3 rank gathers one whole layer at a time in fp32 (4 bytes); the largest layer of common
# language models, the embedding, is 2% (7B) to 20% (135M) of the parameters.
ZERO3_GATHERED_LAYER_FRACTION = 0.1
# NF4 weights (0.5) plus one fp32 scale per 64-weight block (0.0625), or about 0.127 bits per
# weight (0.016) with double quantization (Dettmers et al. 2023).
WEIGHT_BYTES_4BIT = 0.5
QUANT_CONSTANT_BYTES = 0.0625
QUANT_CONSTANT_BYTES_DOUBLE = 0.016
# Rank-16 adapters on every linear layer of a 7B model are about 40M parameters (0.6%); 1% is a
# round upper bound that holds across common model shapes.
LORA_TRAINABLE_FRACTION = 0.01

# Activation allowance: a stated rule of thumb, not a measurement. Fixed CUDA context and allocator
# slack, plus a share per thousand tokens in a micro-batch (activations kept for the backward pass
# and the fp32 logits over a large vocabulary); four times that without gradient checkpointing.
CUDA_CONTEXT_GIB = 1.0
ACTIVATION_GIB_PER_1K_TOKENS = 0.5
NO_CHECKPOINTING_FACTOR = 4.0

# The estimate fits when it uses at most this share of a GPU; up to all of it is a warning.
FITS_FRACTION = 0.9
# On-prem, plain LoRA is chosen over QLoRA when its estimate uses at most this share.
AMPLE_FRACTION = 0.5

# Node labels only cloud providers set.
CLOUD_LABEL_PREFIXES = (
    "eks.amazonaws.com/",
    "alpha.eksctl.io/",
    "cloud.google.com/",
    "kubernetes.azure.com/",
    "node.kubernetes.io/instance-type",
    "oci.oraclecloud.com/",
    "k8s.ovh.net/",
    "doks.digitalocean.com/",
)
CLOUD_PROVIDER_ID_PREFIXES = ("aws://", "gce://", "azure://", "oci://", "digitalocean://", "ibm://")

GPU_MEMORY_LABEL_FALLBACK = "nvidia.com/gpu.memory"


class Verdict(StrEnum):
    OK = "ok"
    WARN = "warn"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Finding:
    """One checklist result; `condition` is the status condition type it feeds."""

    condition: str
    verdict: Verdict
    reason: str
    message: str


# ---------------------------------------------------------------------------------------------
# Goal and baseline


def check_goal(spec: FineTuneJobSpec) -> list[Finding]:
    """Problems with how success will be measured. The hard rules (task, metrics, held-out data) are
    enforced by the schema; these are the ones that need numbers."""
    findings: list[Finding] = []
    expected = spec.dataset.expected_examples
    if spec.goal.held_out_test and spec.goal.test_file is None and expected is not None:
        test_examples = int(expected * spec.dataset.split.test)
        if test_examples < 1:
            findings.append(
                Finding(
                    "GoalMeasurable",
                    Verdict.REFUSE,
                    "NoTestExamples",
                    f"spec.dataset.split.test {spec.dataset.split.test:g} of about {expected:,} examples "
                    "leaves no test example for the baseline: raise split.test or set spec.goal.testFile",
                )
            )
        elif test_examples < MIN_TEST_EXAMPLES:
            findings.append(
                Finding(
                    "GoalMeasurable",
                    Verdict.WARN,
                    "FewTestExamples",
                    f"spec.dataset.split.test {spec.dataset.split.test:g} of about {expected:,} examples "
                    f"holds about {test_examples} test examples (fewer than {MIN_TEST_EXAMPLES}): the "
                    "baseline comparison will be noisy; raise split.test or set spec.goal.testFile",
                )
            )
    if not spec.goal.success_criteria:
        findings.append(
            Finding(
                "GoalMeasurable",
                Verdict.WARN,
                "NoSuccessCriteria",
                "spec.goal.successCriteria is empty, so the job succeeds whatever the final metrics are: "
                "add for example {metric: eval_loss, maxRegression: 0.0}",
            )
        )
    return findings


# ---------------------------------------------------------------------------------------------
# Environment and hardware facts


def looks_like_cloud(node_labels: Iterable[Mapping[str, str]], provider_ids: Iterable[str] = ()) -> bool:
    """True when any node carries a label or providerID that only a cloud provider sets."""
    for labels in node_labels:
        if any(key.startswith(CLOUD_LABEL_PREFIXES) for key in labels):
            return True
    return any(pid.startswith(CLOUD_PROVIDER_ID_PREFIXES) for pid in provider_ids)


def resolve_environment(
    spec: FineTuneJobSpec, settings: OperatorSettings, *, cloud_detected: bool
) -> tuple[Environment, str]:
    """cloud or onprem, and where that came from: the job, the operator setting, or the nodes."""
    if spec.environment != Environment.AUTO:
        return spec.environment, f"spec.environment is {spec.environment.value}"
    if settings.environment != Environment.AUTO:
        return (
            settings.environment,
            f"operator setting FINETUNE_OPERATOR_ENVIRONMENT is {settings.environment.value}",
        )
    if cloud_detected:
        return Environment.CLOUD, "nodes carry cloud-provider labels"
    return Environment.ONPREM, "no node carries a cloud-provider label"


_SIZE_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMBT])$")


def parse_parameter_count(text: str) -> float:
    """ "0.5B" -> 5e8. Raises ValueError naming the value and the accepted form."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(f"parameter count {text!r} is not a number with K, M, B or T, such as 0.5B or 7B")
    return float(match.group(1)) * _SIZE_SUFFIX[match.group(2)]


@dataclass(frozen=True)
class Hardware:
    """What the job will run on, as far as the operator can tell before a pod starts."""

    gpu_memory_gib: float
    gpu_memory_source: str
    gpus_per_node: int
    nodes: int

    @property
    def ranks(self) -> int:
        """Data-parallel processes: one per GPU, or one per node on CPU."""
        return self.nodes * max(self.gpus_per_node, 1)


def hardware(spec: FineTuneJobSpec, settings: OperatorSettings) -> Hardware:
    """GPU memory from the job's nodeSelector label when it has one, else the operator setting."""
    resources = spec.resources
    label = settings.gpu_memory_label or GPU_MEMORY_LABEL_FALLBACK
    raw = resources.node_selector.get(label)
    if raw is not None and raw.isdigit() and int(raw) > 0:
        memory, source = int(raw) / 1024, f"nodeSelector {label}={raw} MiB"
    else:
        memory, source = settings.gpu_memory_gib, "operator setting FINETUNE_OPERATOR_GPU_MEMORY_GIB"
    return Hardware(memory, source, resources.gpus_per_node, resources.nodes)


# ---------------------------------------------------------------------------------------------
# Model size


@dataclass(frozen=True)
class ModelSize:
    """The parameter count read from the model's own files before launch, and which file; or, when
    none could be read, why not, as a clause ("the model's config.json could not be read from
    s3://models/llama/config.json (AccessDenied)")."""

    parameters: float | None = None
    source: str = ""
    failure: str = ""


def format_parameter_count(count: float) -> str:
    """134515008 -> "134.5M": four significant digits, in the form spec.model.parameters takes."""
    for suffix, unit in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= unit:
            return f"{count / unit:.4g}{suffix}"
    return f"{count:.0f}"


def model_parameters(
    spec: FineTuneJobSpec, settings: OperatorSettings, looked_up: ModelSize | None = None
) -> tuple[float, str]:
    """Parameter count and a phrase saying where it came from: the spec, the model's files (as
    `looked_up` by the handler), or the operator's default with the reason nothing better was known."""
    if spec.model.parameters is not None:
        return parse_parameter_count(spec.model.parameters), f"{spec.model.parameters} parameters"
    if looked_up is not None and looked_up.parameters is not None:
        count = looked_up.parameters
        return count, f"{format_parameter_count(count)} parameters (from {looked_up.source})"
    assumed = settings.default_model_parameters
    why = looked_up.failure if looked_up is not None else "the model's size was not looked up"
    return parse_parameter_count(assumed), f"assumed {assumed} parameters ({why}; set spec.model.parameters)"


# ---------------------------------------------------------------------------------------------
# Memory estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB per GPU, by component."""

    method: ResolvedMethodType
    deepspeed_stage: int | None
    weights: float
    gradients: float
    optimizer: float
    activations: float
    ranks: int = 1

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        return (
            f"{_METHOD_LABEL[self.method]}{_stage_label(self.deepspeed_stage, self.ranks)} needs about "
            f"{self.total:.1f} GiB per GPU: weights {self.weights:.1f} + gradients {self.gradients:.1f} + "
            f"optimizer {self.optimizer:.1f} + activations {self.activations:.1f}"
        )


_METHOD_LABEL = {
    ResolvedMethodType.LORA: "LoRA",
    ResolvedMethodType.QLORA: "QLoRA",
    ResolvedMethodType.FULL: "full fine-tuning",
}


def _stage_label(stage: int | None, ranks: int) -> str:
    if stage is None:
        return ""
    return f" with ZeRO-{stage} over {ranks} GPU{'s' if ranks != 1 else ''}"


def activation_allowance_gib(tokens_per_micro_batch: int, *, gradient_checkpointing: bool) -> float:
    per_1k = ACTIVATION_GIB_PER_1K_TOKENS * (1.0 if gradient_checkpointing else NO_CHECKPOINTING_FACTOR)
    return CUDA_CONTEXT_GIB + per_1k * tokens_per_micro_batch / 1000


def estimate_memory(
    method: ResolvedMethodType,
    parameters: float,
    *,
    ranks: int = 1,
    deepspeed_stage: int | None = None,
    offload: str = "none",
    double_quant: bool = True,
    tokens_per_micro_batch: int = 4096,
    gradient_checkpointing: bool = True,
) -> MemoryEstimate:
    """Per-GPU memory for one training process. ZeRO-2 shards gradients and optimizer states over
    `ranks`, ZeRO-3 also the weights; offloaded parts move to CPU memory."""
    activations = activation_allowance_gib(
        tokens_per_micro_batch, gradient_checkpointing=gradient_checkpointing
    )
    if method == ResolvedMethodType.FULL:
        weights, gradients, optimizer = full_model_states(parameters, ranks, deepspeed_stage or 0, offload)
        return MemoryEstimate(
            method, deepspeed_stage, weights / GIB, gradients / GIB, optimizer / GIB, activations, ranks
        )
    trainable = parameters * LORA_TRAINABLE_FRACTION
    if method == ResolvedMethodType.QLORA:
        constants = QUANT_CONSTANT_BYTES_DOUBLE if double_quant else QUANT_CONSTANT_BYTES
        base = parameters * (WEIGHT_BYTES_4BIT + constants)
    else:
        base = parameters * WEIGHT_BYTES_16BIT
    weights = base + trainable * WEIGHT_BYTES_16BIT
    return MemoryEstimate(
        method,
        None,
        weights / GIB,
        trainable * GRADIENT_BYTES / GIB,
        trainable * OPTIMIZER_BYTES / GIB,
        activations,
    )


def full_model_states(parameters: float, ranks: int, stage: int, offload: str) -> tuple[float, float, float]:
    """Bytes per GPU of weights, gradients and optimizer states for full fine-tuning. ZeRO-1
    shards the optimizer over `ranks`, ZeRO-2 also the gradients, ZeRO-3 also the weights; with
    offload the optimizer (and its fp32 gradients) live in CPU memory, and with optimizer+params
    the weights too, but for the layer being computed."""
    shards = max(ranks, 1)
    weights = parameters * WEIGHT_BYTES_16BIT / (shards if stage >= 3 else 1)
    if stage >= 2:
        gradients = parameters * (ZERO3_GRADIENT_BYTES if stage >= 3 else ZERO2_GRADIENT_BYTES) / shards
    else:
        gradients = parameters * GRADIENT_BYTES
    optimizer = parameters * OPTIMIZER_BYTES / (shards if stage >= 1 else 1)
    if offload in ("optimizer", "optimizer+params"):
        optimizer = gradients = 0.0
    if stage >= 3:
        weights += parameters * ZERO3_GATHERED_LAYER_FRACTION * 4.0
        if offload == "optimizer+params":
            weights = parameters * ZERO3_GATHERED_LAYER_FRACTION * 4.0
    return weights, gradients, optimizer


# ---------------------------------------------------------------------------------------------
# Host resources of a trainer pod (CPU memory and local disk), for its requests


RUNTIME_GIB_PER_PROCESS = 3.0  # Python, torch and CUDA libraries, the tokenizer and data of a process
# DeepSpeed's estimators multiply the CPU memory of model states by this, for buffers.
CPU_BUFFER_FACTOR = 1.5
OFFLOAD_OPTIMIZER_BYTES = 16.0  # fp32 master weights, Adam moments and fp32 gradients per parameter
OFFLOAD_PARAMS_BYTES = 2.0  # the 16-bit weights, with optimizer+params under ZeRO-3
SCRATCH_GIB = 5.0  # tokenized data, logs, the final artifact's temporary files


def host_memory_gib(decision: MethodDecision, offload: str, *, per_pod: int, ranks: int, gpus: int) -> float:
    """CPU memory of one pod: each process's runtime and its 16-bit copy of the weights while
    loading (QLoRA quantizes on its GPU as it loads); with ZeRO-Offload each process's partition of
    the model states, as DeepSpeed's own estimators count them (`estimate_zero3_model_states_mem_needs`
    with zero.Init: 18 bytes per parameter over the nodes, times 1.5). Without GPUs the whole
    training state lives in CPU memory."""
    parameters = decision.parameters
    runtime = RUNTIME_GIB_PER_PROCESS * per_pod
    if gpus == 0:
        states = estimate_memory(
            decision.type, parameters, ranks=ranks, deepspeed_stage=decision.deepspeed_stage
        )
        return runtime + per_pod * states.total
    loading = 0.0 if decision.type == ResolvedMethodType.QLORA else parameters * WEIGHT_BYTES_16BIT
    offloaded = 0.0
    if decision.type == ResolvedMethodType.FULL and offload in ("optimizer", "optimizer+params"):
        per_parameter = OFFLOAD_OPTIMIZER_BYTES + (
            OFFLOAD_PARAMS_BYTES if offload == "optimizer+params" else 0.0
        )
        offloaded = parameters * per_parameter / max(ranks, 1) * CPU_BUFFER_FACTOR
    return runtime + per_pod * (loading + offloaded) / GIB


def local_disk_gib(decision: MethodDecision, *, per_pod: int, ranks: int, keep: int) -> float:
    """Local disk of one pod: the downloaded base model, and `keep` local checkpoints of each of
    its processes (the adapters, or for full fine-tuning the 16-bit weights and the process's
    optimizer partition)."""
    parameters = decision.parameters
    model = parameters * WEIGHT_BYTES_16BIT
    if decision.type == ResolvedMethodType.FULL:
        checkpoint = model + per_pod * parameters * OPTIMIZER_BYTES / max(ranks, 1)
    else:
        checkpoint = per_pod * parameters * LORA_TRAINABLE_FRACTION * (WEIGHT_BYTES_16BIT + OPTIMIZER_BYTES)
    return SCRATCH_GIB + (model + (keep + 1) * checkpoint) / GIB  # one more: the next is written first


def estimate_for(
    spec: FineTuneJobSpec,
    method: ResolvedMethodType,
    parameters: float,
    ranks: int,
    deepspeed_stage: int | None = None,
) -> MemoryEstimate:
    """`estimate_memory` with the job's batch, sequence length and method settings."""
    hp = spec.hyperparameters
    quantization = spec.method.quantization
    deepspeed = spec.method.deepspeed
    return estimate_memory(
        method,
        parameters,
        ranks=ranks,
        deepspeed_stage=deepspeed_stage,
        offload=deepspeed.offload if deepspeed is not None else "none",
        double_quant=quantization.double_quant if quantization is not None else True,
        tokens_per_micro_batch=hp.batch_size * spec.dataset.chunking.max_tokens,
        gradient_checkpointing=hp.gradient_checkpointing,
    )


def fits(estimate: MemoryEstimate, gpu_memory_gib: float, fraction: float = FITS_FRACTION) -> bool:
    return estimate.total <= gpu_memory_gib * fraction


# ---------------------------------------------------------------------------------------------
# Method resolution


@dataclass(frozen=True)
class MethodDecision:
    """The method to run, why, and the memory estimate behind it."""

    type: ResolvedMethodType
    reason: str
    deepspeed_stage: int | None = None
    estimate: MemoryEstimate | None = field(default=None, compare=False)
    # The parameter count behind the estimate and where it came from, for the MemoryFits message.
    model_size: str = field(default="", compare=False)
    parameters: float = field(default=0.0, compare=False)


def _choose_stage(spec: FineTuneJobSpec, parameters: float, hw: Hardware) -> tuple[int, MemoryEstimate]:
    """The lowest ZeRO stage whose estimate fits; stage 3 (the smallest) when neither does."""
    zero2 = estimate_for(spec, ResolvedMethodType.FULL, parameters, hw.ranks, 2)
    if hw.gpus_per_node == 0 or fits(zero2, hw.gpu_memory_gib):
        return 2, zero2
    return 3, estimate_for(spec, ResolvedMethodType.FULL, parameters, hw.ranks, 3)


def _gpu_phrase(hw: Hardware) -> str:
    if hw.gpus_per_node == 0:
        return "no GPU requested"
    return f"{hw.gpu_memory_gib:g} GiB per GPU ({hw.gpu_memory_source})"


def resolve_method(
    spec: FineTuneJobSpec,
    settings: OperatorSettings,
    *,
    cloud_detected: bool = False,
    model_size: ModelSize | None = None,
) -> MethodDecision:
    """The method a job runs with. An explicit method.type is kept (full gets its ZeRO stage);
    auto follows the checklist: on-prem -> QLoRA, or LoRA when GPU memory is ample; cloud -> full
    with DeepSpeed ZeRO when the data is large enough, else LoRA. `model_size` is what the handler
    read from the model's files; it counts when spec.model.parameters is absent."""
    parameters, size_phrase = model_parameters(spec, settings, model_size)
    decision = _resolve(spec, settings, parameters, size_phrase, cloud_detected=cloud_detected)
    return replace(decision, model_size=size_phrase, parameters=parameters)


def _resolve(
    spec: FineTuneJobSpec,
    settings: OperatorSettings,
    parameters: float,
    size_phrase: str,
    *,
    cloud_detected: bool,
) -> MethodDecision:
    hw = hardware(spec, settings)
    requested = spec.method.type
    if requested == MethodType.FULL:
        return _explicit_full(spec, parameters, hw)
    if requested in (MethodType.LORA, MethodType.QLORA):
        kind = ResolvedMethodType(requested.value)
        estimate = estimate_for(spec, kind, parameters, hw.ranks)
        return MethodDecision(kind, f"requested in spec.method.type ({size_phrase})", None, estimate)
    environment, env_source = resolve_environment(spec, settings, cloud_detected=cloud_detected)
    if environment == Environment.ONPREM:
        return _auto_onprem(spec, parameters, size_phrase, hw, env_source)
    return _auto_cloud(spec, parameters, size_phrase, hw, env_source)


def _explicit_full(spec: FineTuneJobSpec, parameters: float, hw: Hardware) -> MethodDecision:
    deepspeed = spec.method.deepspeed
    stage: int
    if deepspeed is not None and deepspeed.stage is not None:
        stage = deepspeed.stage
        estimate = estimate_for(spec, ResolvedMethodType.FULL, parameters, hw.ranks, stage)
        reason = f"requested in spec.method.type, ZeRO-{stage} from spec.method.deepspeed.stage"
    else:
        stage, estimate = _choose_stage(spec, parameters, hw)
        choice = (
            "the lowest stage that fits"
            if hw.gpus_per_node == 0 or fits(estimate, hw.gpu_memory_gib)
            else "the stage that needs least memory, though it does not fit"
        )
        reason = (
            f"requested in spec.method.type; ZeRO-{stage}, {choice}, over {hw.ranks} process(es), "
            f"{_gpu_phrase(hw)}: {estimate.describe()}"
        )
    return MethodDecision(ResolvedMethodType.FULL, reason, stage, estimate)


def _auto_onprem(
    spec: FineTuneJobSpec, parameters: float, size_phrase: str, hw: Hardware, env_source: str
) -> MethodDecision:
    lora = estimate_for(spec, ResolvedMethodType.LORA, parameters, hw.ranks)
    qlora = estimate_for(spec, ResolvedMethodType.QLORA, parameters, hw.ranks)
    where = f"on-prem ({env_source}), {size_phrase}, {_gpu_phrase(hw)}"
    ample = hw.gpus_per_node > 0 and fits(lora, hw.gpu_memory_gib, AMPLE_FRACTION)
    if ample or spec.dataset.format == DatasetFormat.AUDIO:
        why = (
            f"it uses at most {AMPLE_FRACTION:.0%} of the GPU ({lora.describe()})"
            if ample
            else "QLoRA does not support audio"
        )
        return MethodDecision(ResolvedMethodType.LORA, f"{where}: LoRA, because {why}", None, lora)
    why = (
        "no GPU memory to spare for a 16-bit base"
        if hw.gpus_per_node == 0
        else f"LoRA would need about {lora.total:.1f} GiB, more than {AMPLE_FRACTION:.0%} of the GPU"
    )
    return MethodDecision(
        ResolvedMethodType.QLORA, f"{where}: QLoRA, because {why} ({qlora.describe()})", None, qlora
    )


def _auto_cloud(
    spec: FineTuneJobSpec, parameters: float, size_phrase: str, hw: Hardware, env_source: str
) -> MethodDecision:
    where = f"cloud ({env_source}), {size_phrase}, {_gpu_phrase(hw)}"
    expected = spec.dataset.expected_examples
    lora = estimate_for(spec, ResolvedMethodType.LORA, parameters, hw.ranks)
    if expected is None:
        return MethodDecision(
            ResolvedMethodType.LORA,
            f"{where}: LoRA, because the dataset size is unknown (set spec.dataset.expectedExamples to "
            f"{FULL_DISCOURAGED_BELOW_EXAMPLES:,} or more to consider full fine-tuning)",
            None,
            lora,
        )
    if expected < FULL_DISCOURAGED_BELOW_EXAMPLES:
        return MethodDecision(
            ResolvedMethodType.LORA,
            f"{where}: LoRA, because about {expected:,} examples is fewer than "
            f"{FULL_DISCOURAGED_BELOW_EXAMPLES:,}, too few for full fine-tuning to pay off",
            None,
            lora,
        )
    stage, estimate = _choose_stage(spec, parameters, hw)
    if hw.gpus_per_node > 0 and not fits(estimate, hw.gpu_memory_gib):
        return MethodDecision(
            ResolvedMethodType.LORA,
            f"{where}, about {expected:,} examples: LoRA, because full fine-tuning does not fit even "
            f"with ZeRO-3 over {hw.ranks} GPU(s): {estimate.describe()}",
            None,
            lora,
        )
    return MethodDecision(
        ResolvedMethodType.FULL,
        f"{where}, about {expected:,} examples (at least {FULL_DISCOURAGED_BELOW_EXAMPLES:,}): full "
        f"fine-tuning with DeepSpeed ZeRO-{stage} over {hw.ranks} process(es): {estimate.describe()}",
        stage,
        estimate,
    )


# ---------------------------------------------------------------------------------------------
# Preflight checks


def check_gpu_memory(decision: MethodDecision, hw: Hardware) -> Finding:
    """ok, warn (over FITS_FRACTION of a GPU) or refuse (over the whole GPU), with the numbers."""
    estimate = decision.estimate
    if hw.gpus_per_node == 0 or estimate is None:
        return Finding("MemoryFits", Verdict.OK, "NoGPU", "no GPU requested: GPU memory check skipped")
    available = hw.gpu_memory_gib
    size = f"{decision.model_size}: " if decision.model_size else ""
    numbers = f"{size}{estimate.describe()}; {available:g} GiB available ({hw.gpu_memory_source})"
    if fits(estimate, available):
        return Finding("MemoryFits", Verdict.OK, "EstimateFits", numbers)
    fix = _memory_fix(decision.type)
    if estimate.total <= available:
        return Finding(
            "MemoryFits",
            Verdict.WARN,
            "EstimateTight",
            f"{numbers}: above {FITS_FRACTION:.0%} of the GPU, out-of-memory is likely; {fix}",
        )
    return Finding("MemoryFits", Verdict.REFUSE, "EstimateExceedsGPU", f"{numbers}: does not fit; {fix}")


def _memory_fix(method: ResolvedMethodType) -> str:
    if method == ResolvedMethodType.FULL:
        return (
            "use more GPUs (spec.resources), spec.method.deepspeed.stage: 3 with offload, or method.type "
            "lora/qlora"
        )
    if method == ResolvedMethodType.LORA:
        return "use method.type qlora, lower hyperparameters.batchSize or dataset.chunking.maxTokens"
    return "lower hyperparameters.batchSize or dataset.chunking.maxTokens, or select GPUs with more memory"


def check_data_size(method: ResolvedMethodType, examples: int | None, *, allow_small: bool) -> Finding:
    """The small-data rules for full fine-tuning. `examples` is the count the trainer reported after
    preparation, or the job's expectedExamples hint before then (None: not known yet)."""
    if examples is None:
        return Finding("DataSufficient", Verdict.OK, "CountUnknown", "example count not known yet")
    if method != ResolvedMethodType.FULL or examples >= FULL_DISCOURAGED_BELOW_EXAMPLES:
        return Finding("DataSufficient", Verdict.OK, "Enough", f"{examples:,} examples for {method.value}")
    if examples < FULL_REFUSED_BELOW_EXAMPLES and not allow_small:
        return Finding(
            "DataSufficient",
            Verdict.REFUSE,
            "TooFewExamplesForFull",
            f"full fine-tuning on {examples:,} examples (fewer than {FULL_REFUSED_BELOW_EXAMPLES:,}) "
            "overfits and forgets: use spec.method.type lora or qlora, add data, or set "
            "spec.method.allowSmallDataFullFineTune: true",
        )
    allowed = (
        " (allowed by spec.method.allowSmallDataFullFineTune)"
        if examples < FULL_REFUSED_BELOW_EXAMPLES
        else ""
    )
    return Finding(
        "DataSufficient",
        Verdict.WARN,
        "FewExamplesForFull",
        f"full fine-tuning on {examples:,} examples "
        f"(fewer than {FULL_DISCOURAGED_BELOW_EXAMPLES:,}){allowed}: "
        "LoRA usually does as well on this little data at a fraction of the cost; consider "
        "spec.method.type lora",
    )


# ---------------------------------------------------------------------------------------------
# Secrets


@dataclass(frozen=True, order=True)
class SecretRef:
    """A Secret key the job needs, and the spec field that asks for it."""

    name: str
    key: str
    referenced_by: str


def required_secrets(spec: FineTuneJobSpec) -> list[SecretRef]:
    """Every Secret key the training pods will read, once each, sorted; `referenced_by` lists the
    spec fields that use it."""
    users: dict[tuple[str, str], list[str]] = {}
    store = spec.checkpoints.store
    if store.credentials_secret is not None:
        path = "spec.checkpoints.store.credentialsSecret"
        users.setdefault((store.credentials_secret, store.access_key_id_key), []).append(path)
        users.setdefault((store.credentials_secret, store.secret_access_key_key), []).append(path)
    for var in spec.env:
        if var.secret_key_ref is not None:
            key = (var.secret_key_ref.name, var.secret_key_ref.key)
            users.setdefault(key, []).append(f"spec.env {var.name}")
    return [SecretRef(name, key, ", ".join(paths)) for (name, key), paths in sorted(users.items())]


def check_secrets(
    required: Iterable[SecretRef], present: Mapping[str, Collection[str]], namespace: str
) -> Finding:
    """`present` maps each Secret found in the namespace to its key names (never values)."""
    problems = []
    for ref in required:
        if ref.name not in present:
            problems.append(
                f"Secret {ref.name} not found in namespace {namespace} (needed by {ref.referenced_by})"
            )
        elif ref.key not in present[ref.name]:
            problems.append(f"Secret {ref.name} has no key {ref.key} (needed by {ref.referenced_by})")
    if not problems:
        return Finding("SecretsReady", Verdict.OK, "SecretsFound", "every referenced Secret key exists")
    unique = list(dict.fromkeys(problems))
    return Finding(
        "SecretsReady",
        Verdict.REFUSE,
        "SecretMissing",
        "; ".join(unique) + ": create it (kubectl create secret generic ...) or fix the reference",
    )


# ---------------------------------------------------------------------------------------------
# Everything before a pod starts


@dataclass(frozen=True)
class Preflight:
    environment: Environment
    environment_reason: str
    decision: MethodDecision
    findings: tuple[Finding, ...]

    @property
    def is_cloud(self) -> bool:
        return self.environment == Environment.CLOUD

    @property
    def refused(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.verdict == Verdict.REFUSE)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.verdict == Verdict.WARN)


def preflight(
    spec: FineTuneJobSpec,
    settings: OperatorSettings,
    *,
    namespace: str,
    secret_keys: Mapping[str, Collection[str]],
    cloud_detected: bool = False,
    model_size: ModelSize | None = None,
) -> Preflight:
    """Method choice plus every check that can run before a pod: goal, data-size hint, GPU memory
    and secrets. The job may start only when `refused` is empty."""
    environment, environment_reason = resolve_environment(spec, settings, cloud_detected=cloud_detected)
    decision = resolve_method(spec, settings, cloud_detected=cloud_detected, model_size=model_size)
    findings = [
        *check_goal(spec),
        check_data_size(
            decision.type,
            spec.dataset.expected_examples,
            allow_small=spec.method.allow_small_data_full_fine_tune,
        ),
        check_gpu_memory(decision, hardware(spec, settings)),
        check_secrets(required_secrets(spec), secret_keys, namespace),
    ]
    return Preflight(environment, environment_reason, decision, tuple(findings))
