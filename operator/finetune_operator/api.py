"""The FineTuneJob resource: spec and status as pydantic models.

These models are the single source of truth. The CRD in `crds/` is generated from them
(`python -m finetune_operator.crd`), so every description here is what `kubectl explain ftj`
shows, and every constraint here is enforced by the API server as well as by the operator.
Cross-field rules are written twice on purpose: as CEL (`x-kubernetes-validations`) so a bad
manifest is refused at `kubectl apply` time, and as pydantic validators so the operator never
acts on a spec that slipped past an older CRD.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
CATEGORIES = ("finetune",)

# Names that look like they hold a secret must come from a Secret, never a literal value.
SECRET_LOOKING_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
SECRET_LOOKING_RE2 = "(?i)(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)"  # noqa: S105 (a pattern)

# Set by the operator on every trainer pod; a user entry would silently shadow them.
RESERVED_ENV_NAMES = (
    "JOB_ID",
    "JOB_NAME",
    "JOB_NAMESPACE",
    "IS_CLOUD",
    "USER_ID",
    "FINETUNE_CONFIG",
    "METRICS_PORT",
    "POD_IP",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "NNODES",
    "NODE_RANK",
    "NPROC_PER_NODE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)

# Metrics the trainer always computes, usable in success criteria without listing them.
ALWAYS_COMPUTED_METRICS = ("eval_loss", "perplexity")

MAX_METRICS = 16
MAX_ENV = 64


def _rules(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


def _cel(rule: str, message: str, **extra: str) -> dict[str, str]:
    return {"rule": rule, "message": message, **extra}


def _immutable(field: str) -> dict[str, Any]:
    return _rules(
        _cel(
            "self == oldSelf",
            f"spec.{field} is immutable once the job exists: create a new FineTuneJob to change it",
        )
    )


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


# A field whose whole sub-object is optional: absent means "all defaults". The CRD carries the
# complete default object, because the API server checks a default against the CEL rules as is.
def _defaulted_object(description: str, factory: type[BaseModel], **extra: Any) -> Any:
    default = factory().model_dump(mode="json", by_alias=True, exclude_none=True)
    schema_extra: dict[str, Any] = {"default": default, **extra}
    return Field(default_factory=factory, description=description, json_schema_extra=schema_extra)


SecretName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
]
SecretKey = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
METRIC_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]*$"
MetricName = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=METRIC_NAME_PATTERN)]
SourceUri = Annotated[str, StringConstraints(min_length=6, max_length=1024, pattern=r"^(hf|s3|file)://\S+$")]
Text = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=317)]
LabelValue = Annotated[str, StringConstraints(max_length=63)]
Quantity = Annotated[
    str, StringConstraints(max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")
]


# ---------------------------------------------------------------------------------------------
# spec.goal


class Metric(StrEnum):
    """A metric the trainer measures on the baseline and after each evaluation."""

    EVAL_LOSS = "eval_loss"
    PERPLEXITY = "perplexity"
    EXACT_MATCH = "exact_match"
    TOKEN_F1 = "token_f1"  # noqa: S105 (a metric name)
    ROUGE_L = "rougeL"
    SCENARIO_PASS_RATE = "scenario_pass_rate"  # noqa: S105 (a metric name)
    WER = "wer"  # word error rate, for speech (format: audio)


class SuccessCriterion(_Model):
    """One rule the final evaluation must pass: set exactly one of maxRegression, minImprovement,
    atLeast or atMost."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "[has(self.maxRegression), has(self.minImprovement), has(self.atLeast), has(self.atMost)]"
                ".filter(x, x).size() == 1",
                "spec.goal.successCriteria entries need exactly one of maxRegression, minImprovement, "
                "atLeast or atMost",
                messageExpression="'spec.goal.successCriteria for ' + self.metric + ': set exactly one of "
                "maxRegression, minImprovement, atLeast or atMost'",
            )
        )
    )

    metric: Metric = Field(
        description="Metric to judge; must be in spec.goal.metrics unless it is eval_loss or perplexity."
    )
    max_regression: Annotated[float, Field(ge=0)] | None = Field(
        default=None,
        description=(
            "Largest allowed worsening against the baseline, in the metric's units. "
            "0 means the fine-tuned model must be at least as good as the base model."
        ),
    )
    min_improvement: float | None = Field(
        default=None, description="The fine-tuned model must beat the baseline by at least this much."
    )
    at_least: float | None = Field(
        default=None, description="Lowest acceptable final value (for metrics where higher is better)."
    )
    at_most: float | None = Field(
        default=None, description="Highest acceptable final value (for metrics where lower is better)."
    )
    on_failure: Literal["fail", "warn"] = Field(
        default="fail",
        description="fail: an unmet rule fails the job; warn: it is recorded and the job succeeds.",
    )

    @model_validator(mode="after")
    def _one_rule(self) -> Self:
        rules = (self.max_regression, self.min_improvement, self.at_least, self.at_most)
        if sum(rule is not None for rule in rules) != 1:
            raise ValueError(
                f"spec.goal.successCriteria for {self.metric.value}: set exactly one of maxRegression, "
                "minImprovement, atLeast or atMost"
            )
        return self


class GoalSpec(_Model):
    """What the fine-tune is for and how success is measured. A baseline of the untouched base model
    is evaluated on held-out data first, so the result can be compared with where it started."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.heldOutTest || has(self.testFile)",
                "spec.goal needs held-out test data for the baseline: set goal.heldOutTest: true "
                "(splits dataset.split.test off the data) or goal.testFile: s3://... ",
                fieldPath=".heldOutTest",
                reason="FieldValueRequired",
            ),
            _cel(
                "!has(self.successCriteria) || self.successCriteria.all(c, c.metric in self.metrics"
                " || c.metric in ['eval_loss', 'perplexity'])",
                "spec.goal.successCriteria refers to a metric that is not in spec.goal.metrics: "
                "add it to goal.metrics or use eval_loss/perplexity",
                fieldPath=".successCriteria",
            ),
        )
    )

    task: Annotated[str, StringConstraints(min_length=1, max_length=500)] = Field(
        description='The task in one sentence, for example "answer support tickets".'
    )
    metrics: Annotated[list[Metric], Field(min_length=1, max_length=MAX_METRICS)] = Field(
        description=(
            "Metrics measured on the baseline and after every evaluation: eval_loss, perplexity, "
            "exact_match, token_f1, rougeL, scenario_pass_rate (share of validation.heldOutScenarios "
            "answered as expected), wer (word error rate, for speech)."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    held_out_test: bool = Field(
        default=True,
        description=(
            "Hold out dataset.split.test of the prepared data as the test set for the baseline and "
            "the final evaluation. Set false only together with goal.testFile."
        ),
    )
    test_file: SourceUri | None = Field(
        default=None,
        description="An explicit test set (same format as the dataset), used instead of a split.",
    )
    success_criteria: Annotated[list[SuccessCriterion], Field(max_length=8)] = Field(
        default_factory=list,
        description="Rules the final evaluation must pass; a failed rule fails the job unless warnOnly.",
    )

    @model_validator(mode="after")
    def _needs_test_data(self) -> Self:
        if not self.held_out_test and self.test_file is None:
            raise ValueError(
                "spec.goal.heldOutTest is false and spec.goal.testFile is not set: the baseline needs "
                "held-out test data; set goal.heldOutTest: true or goal.testFile"
            )
        known = set(self.metrics) | set(ALWAYS_COMPUTED_METRICS)
        for index, criterion in enumerate(self.success_criteria):
            if criterion.metric not in known:
                raise ValueError(
                    f"spec.goal.successCriteria[{index}].metric is {criterion.metric.value}, which is not "
                    "measured: add it to spec.goal.metrics or use eval_loss/perplexity"
                )
        return self


# ---------------------------------------------------------------------------------------------
# spec.model


class ModelSpec(_Model):
    """The base model to fine-tune."""

    source: SourceUri = Field(
        description=(
            "Where the base model comes from: hf://<org>/<name> (a model hub id), s3://bucket/path "
            "or file:///path (a directory written by save_pretrained)."
        )
    )
    revision: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = Field(
        default=None,
        description="Hub revision to pin, ideally a commit hash, so a rerun trains the same weights.",
    )
    parameters: (
        Annotated[str, StringConstraints(max_length=16, pattern=r"^[0-9]+(\.[0-9]+)?[KMBT]$")] | None
    ) = Field(
        default=None,
        description=(
            'Parameter count of the model, for example "0.5B" or "7B". Used to choose the method and '
            "to check GPU memory before any pod starts; the operator's default is used when absent."
        ),
    )


# ---------------------------------------------------------------------------------------------
# spec.dataset


class DatasetFormat(StrEnum):
    """How examples are laid out in the dataset."""

    ALPACA = "alpaca"
    SHAREGPT = "sharegpt"
    TEXT = "text"
    AUDIO = "audio"


class Dedupe(StrEnum):
    """Duplicate removal."""

    NONE = "none"
    EXACT = "exact"
    EXACT_AND_NEAR = "exact+near"


class PreprocessingSpec(_Model):
    """Cleaning applied before tokenization."""

    dedupe: Dedupe = Field(
        default=Dedupe.EXACT_AND_NEAR,
        description=(
            "Duplicate removal: none, exact, or exact+near (MinHash near-duplicates too). Applied across "
            "the train/validation/test boundary so no test example leaks into training."
        ),
    )
    normalize: bool = Field(default=True, description="Unicode normalization and whitespace cleanup.")
    strip_boilerplate: bool = Field(
        default=True,
        description=(
            "Remove web boilerplate from document fields (alpaca input, text): navigation menus, cookie "
            "banners, repeated header/footer lines. Answers and instructions are never stripped."
        ),
    )
    warn_duplicate_share: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.2,
        description="Warn (data report, model card, job log) when more than this share of examples are "
        "duplicates or near duplicates.",
    )
    max_duplicate_share: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.5,
        description="Refuse the data when more than this share of examples are duplicates or near "
        "duplicates; 1 never refuses.",
    )
    max_bad_example_share: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.05,
        description="Examples that cannot be trained on (empty answer, answer cut off by maxTokens, "
        "tokenizer round trip fails) are dropped and counted; refuse the data when more than this share are.",
    )


class ChunkingSpec(_Model):
    """How tokenized examples are cut and packed into training sequences."""

    max_tokens: Annotated[int, Field(ge=16, le=131072)] = Field(
        default=1024,
        description="Longest training sequence in tokens; never beyond the model's context length.",
    )
    packing: bool = Field(
        default=True,
        description="Pack short examples into one sequence (without attention across examples) for speed.",
    )


class SplitSpec(_Model):
    """Deterministic train/validation/test split of the prepared examples."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.validation + self.test <= 0.5",
                "spec.dataset.split.validation + split.test must be at most 0.5 so most data is trained on",
            )
        )
    )

    validation: Annotated[float, Field(ge=0, le=0.5)] = Field(
        default=0.05, description="Fraction of examples held out for validation during training."
    )
    test: Annotated[float, Field(ge=0, le=0.5)] = Field(
        default=0.05,
        description="Fraction of examples held out as the test set for baseline and final evaluation.",
    )
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = Field(
        default=42, description="Seed of the split; the same seed gives the same split."
    )

    @model_validator(mode="after")
    def _leaves_training_data(self) -> Self:
        if self.validation + self.test > 0.5:
            raise ValueError(
                f"spec.dataset.split holds out {self.validation + self.test:g} of the data "
                f"(validation {self.validation:g} + test {self.test:g}): keep the sum at most 0.5"
            )
        return self


class DatasetSpec(_Model):
    """The training data and how it is prepared."""

    source: SourceUri = Field(
        description="Where the data is: s3://bucket/file.jsonl, hf://datasets/<id> or file:///path.",
    )
    format: DatasetFormat = Field(
        description="Example layout: alpaca (instruction/input/output), sharegpt (conversations), "
        "text (raw completion) or audio (speech).",
    )
    preprocessing: PreprocessingSpec = _defaulted_object(
        "Cleaning before tokenization (all on by default).", PreprocessingSpec
    )
    chunking: ChunkingSpec = _defaulted_object("Sequence length and packing.", ChunkingSpec)
    split: SplitSpec = _defaulted_object("Train/validation/test split.", SplitSpec)
    train_on_prompt: bool = Field(
        default=False, description="false: loss only on the responses (prompt tokens masked)."
    )
    expected_examples: Annotated[int, Field(ge=0, le=10**10)] | None = Field(
        default=None,
        description=(
            "Roughly how many examples the data holds. The exact count is known only after preparation; "
            "this hint lets method auto choose full fine-tuning (5,000 or more) before then."
        ),
    )


# ---------------------------------------------------------------------------------------------
# spec.method


class MethodType(StrEnum):
    """Fine-tuning method."""

    AUTO = "auto"
    LORA = "lora"
    QLORA = "qlora"
    FULL = "full"


class LoraSpec(_Model):
    """Low-rank adapter settings (lora and qlora)."""

    r: Annotated[int, Field(ge=1, le=512)] = Field(default=16, description="Adapter rank.")
    alpha: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=32, description="Adapter scaling; the update is scaled by alpha / r."
    )
    dropout: Annotated[float, Field(ge=0, le=0.5)] = Field(default=0.05, description="Adapter dropout.")
    target_modules: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=128)]], Field(max_length=32)
    ] = Field(
        default_factory=lambda: ["all-linear"],
        description='Modules that get adapters; "all-linear" means every linear layer but the output head.',
        json_schema_extra={"default": ["all-linear"], "x-kubernetes-list-type": "set"},
    )


class ComputeDtype(StrEnum):
    """Floating-point type used for computation."""

    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class QuantizationSpec(_Model):
    """4-bit quantization of the frozen base model (QLoRA)."""

    bits: Literal[4] = Field(default=4, description="Bits per base-model weight; QLoRA uses 4.")
    quant_type: Literal["nf4", "fp4"] = Field(
        default="nf4", description="4-bit data type: nf4 (NormalFloat, recommended) or fp4."
    )
    double_quant: bool = Field(
        default=True, description="Also quantize the quantization constants (saves about 0.4 bits/weight)."
    )
    compute_dtype: ComputeDtype = Field(
        default=ComputeDtype.BFLOAT16,
        description="Type the 4-bit weights are dequantized to for computation.",
    )


class DeepSpeedSpec(_Model):
    """DeepSpeed ZeRO settings for full fine-tuning."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.offload != 'optimizer+params' || !has(self.stage) || self.stage == 3",
                "spec.method.deepspeed.offload optimizer+params needs ZeRO stage 3: set deepspeed.stage: 3 "
                "or offload: optimizer",
                fieldPath=".offload",
            )
        )
    )

    stage: Literal[2, 3] | None = Field(
        default=None,
        description=(
            "ZeRO stage: 2 shards optimizer states and gradients, 3 also shards the weights. "
            "When absent the operator picks the lowest stage whose memory estimate fits the GPUs."
        ),
    )
    offload: Literal["none", "optimizer", "optimizer+params"] = Field(
        default="none",
        description=(
            "Keep optimizer states (optimizer) or also the weights (optimizer+params, stage 3 only) in "
            "CPU memory: slower, much less GPU memory."
        ),
    )

    @model_validator(mode="after")
    def _params_offload_needs_stage3(self) -> Self:
        if self.offload == "optimizer+params" and self.stage == 2:
            raise ValueError(
                "spec.method.deepspeed.offload is optimizer+params with stage 2: parameter offload needs "
                "stage 3; set deepspeed.stage: 3 or offload: optimizer"
            )
        return self


class MethodSpec(_Model):
    """How the model is trained. auto picks one from the environment, the data size and GPU memory
    and records the choice and its reason in status.method."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.type != 'qlora' || has(self.quantization)",
                "spec.method.type qlora needs 4-bit quantization settings: add method.quantization: "
                "{bits: 4} (nf4 and double quantization are the defaults)",
                fieldPath=".quantization",
                reason="FieldValueRequired",
            ),
            _cel(
                "!has(self.quantization) || self.type == 'qlora'",
                "spec.method.quantization applies only to method.type qlora: remove it or set type: qlora",
                messageExpression="'spec.method.quantization applies only to method.type qlora, not "
                "' + self.type + ': remove method.quantization or set method.type: qlora'",
                fieldPath=".quantization",
                reason="FieldValueForbidden",
            ),
            _cel(
                "!has(self.deepspeed) || self.type == 'full'",
                "spec.method.deepspeed applies only to method.type full: remove it or set type: full",
                messageExpression="'spec.method.deepspeed applies only to method.type full, not ' + "
                "self.type + ': remove method.deepspeed or set method.type: full'",
                fieldPath=".deepspeed",
                reason="FieldValueForbidden",
            ),
            _cel(
                "!has(self.lora) || self.type != 'full'",
                "spec.method.lora does not apply to method.type full: remove it or choose lora/qlora/auto",
                fieldPath=".lora",
                reason="FieldValueForbidden",
            ),
        )
    )

    type: MethodType = Field(
        default=MethodType.AUTO,
        description=(
            "auto: on-prem -> qlora (lora when GPU memory is ample); cloud -> full with DeepSpeed ZeRO when "
            "the data has 5,000 or more examples (see dataset.expectedExamples), else lora. "
            "lora: adapters on a 16-bit base. qlora: adapters on a 4-bit base (least memory). "
            "full: all weights, with DeepSpeed ZeRO; the only method that runs on more than one node."
        ),
    )
    lora: LoraSpec | None = Field(
        default=None, description="Adapter settings for lora, qlora and auto (defaults when absent)."
    )
    quantization: QuantizationSpec | None = Field(
        default=None, description="4-bit quantization of the base model; required for qlora, only for qlora."
    )
    deepspeed: DeepSpeedSpec | None = Field(
        default=None, description="DeepSpeed ZeRO settings; only for full (defaults when absent)."
    )
    allow_small_data_full_fine_tune: bool = Field(
        default=False,
        description=(
            "Full fine-tuning on fewer than 1,000 examples is refused because it overfits and forgets; "
            "set true to run it anyway."
        ),
    )

    @model_validator(mode="after")
    def _sub_blocks_match_type(self) -> Self:
        if self.type == MethodType.QLORA and self.quantization is None:
            raise ValueError(
                "spec.method.type qlora needs 4-bit quantization settings and spec.method.quantization "
                "is missing: add method.quantization: {bits: 4}"
            )
        if self.quantization is not None and self.type != MethodType.QLORA:
            raise ValueError(
                f"spec.method.quantization is set with method.type {self.type.value}: quantization applies "
                "only to qlora; remove it or set method.type: qlora"
            )
        if self.deepspeed is not None and self.type != MethodType.FULL:
            raise ValueError(
                f"spec.method.deepspeed is set with method.type {self.type.value}: DeepSpeed applies only "
                "to full; remove it or set method.type: full"
            )
        if self.lora is not None and self.type == MethodType.FULL:
            raise ValueError(
                "spec.method.lora is set with method.type full: adapters do not apply to full fine-tuning; "
                "remove it or choose lora, qlora or auto"
            )
        return self


# ---------------------------------------------------------------------------------------------
# spec.hyperparameters


class LrScheduler(StrEnum):
    """Learning-rate schedule."""

    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


class HyperparametersSpec(_Model):
    """Optimization settings. The defaults suit LoRA/QLoRA; lower learningRate (about 2e-5) for full."""

    epochs: Annotated[float, Field(gt=0, le=100)] = Field(
        default=3, description="Passes over the training split (fractions allowed)."
    )
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=2e-4, description="Peak learning rate."
    )
    batch_size: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=4, description="Sequences per device per step (micro-batch)."
    )
    gradient_accumulation: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=4, description="Micro-batches accumulated per optimizer step."
    )
    warmup_ratio: Annotated[float, Field(ge=0, le=0.5)] = Field(
        default=0.03, description="Fraction of steps spent warming the learning rate up."
    )
    weight_decay: Annotated[float, Field(ge=0, le=1)] = Field(default=0.0, description="AdamW weight decay.")
    lr_scheduler: LrScheduler = Field(default=LrScheduler.COSINE, description="Learning-rate schedule.")
    gradient_checkpointing: bool = Field(
        default=True, description="Recompute activations in the backward pass to save memory."
    )
    max_steps: Annotated[int, Field(ge=1, le=10**8)] | None = Field(
        default=None, description="Stop after this many optimizer steps (overrides epochs)."
    )
    eval_steps: Annotated[int, Field(ge=1, le=10**8)] | None = Field(
        default=None,
        description="Evaluate every N steps; absent: every epoch, or more often when the data is small.",
    )
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = Field(
        default=42, description="Seed for initialization, shuffling and dropout."
    )


# ---------------------------------------------------------------------------------------------
# spec.resources


class Toleration(_Model):
    """A Kubernetes toleration, copied to the training pods."""

    key: Annotated[str, StringConstraints(max_length=317)] | None = Field(
        default=None, description="Taint key; empty with operator Exists tolerates everything."
    )
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: LabelValue | None = Field(default=None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty means all effects."
    )
    toleration_seconds: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


class ResourcesSpec(_Model):
    """Where and on how much hardware the training runs."""

    gpus_per_node: Annotated[int, Field(ge=0, le=16)] = Field(
        default=1,
        description="GPUs (nvidia.com/gpu) per training pod. 0 runs on CPU (tests and tiny models only).",
    )
    nodes: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1,
        description="Training pods, one per node. More than 1 needs method.type full (DeepSpeed).",
    )
    cpu: Quantity | None = Field(
        default=None, description='CPU request per pod, for example "8"; default 2 per trainer process.'
    )
    memory: Quantity | None = Field(
        default=None,
        description=(
            'Memory request and limit per pod, for example "64Gi"; default: the operator\'s estimate, '
            "as a request only. /dev/shm may use half of it."
        ),
    )
    ephemeral_storage: Quantity | None = Field(
        default=None,
        description=(
            'Local disk request per pod (model download, local checkpoints), for example "200Gi"; '
            "default: the operator's estimate."
        ),
    )
    node_selector: Annotated[dict[LabelKey, LabelValue], Field(max_length=32)] = Field(
        default_factory=dict,
        description=(
            "Node labels the pods must match. A nvidia.com/gpu.memory label (MiB, as set by GPU feature "
            "discovery) also tells the memory check how much memory each GPU has."
        ),
    )
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(
        default_factory=list, description="Tolerations for tainted GPU nodes."
    )


# ---------------------------------------------------------------------------------------------
# spec.checkpoints


class ChecksumMode(StrEnum):
    """When boto3 adds request checksums."""

    WHEN_REQUIRED = "when_required"
    WHEN_SUPPORTED = "when_supported"


class CheckpointStoreSpec(_Model):
    """S3-compatible object store for checkpoints and the final model."""

    endpoint: Annotated[str, StringConstraints(max_length=512, pattern=r"^(https?://\S+)?$")] = Field(
        default="", description="S3 endpoint URL; empty means AWS S3."
    )
    region: Annotated[str, StringConstraints(max_length=64)] = Field(
        default="", description="Region of the bucket; empty means the client default."
    )
    bucket: Annotated[str, StringConstraints(min_length=3, max_length=63)] = Field(
        description="Bucket that receives checkpoints."
    )
    prefix: Annotated[str, StringConstraints(max_length=512)] = Field(
        default="finetune",
        description="Key prefix; objects go under <prefix>/<namespace>/<name>/<uid>/.",
    )
    path_style: bool = Field(
        default=True, description="Path-style addressing (what most S3-compatible servers need)."
    )
    checksum_mode: ChecksumMode = Field(
        default=ChecksumMode.WHEN_REQUIRED,
        description="when_required suits S3-compatible servers that reject newer default checksums.",
    )
    credentials_secret: SecretName | None = Field(
        default=None,
        description=(
            "Secret holding the access key pair, passed to the trainer as AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY. Absent: the environment's default chain (IAM role, web identity)."
        ),
    )
    access_key_id_key: SecretKey = Field(
        default="accessKeyId", description="Key in credentialsSecret holding the access key id."
    )
    secret_access_key_key: SecretKey = Field(
        default="secretAccessKey", description="Key in credentialsSecret holding the secret access key."
    )


class CheckpointsSpec(_Model):
    """Checkpointing: saved, uploaded, verified by restoring, and used to resume after interruptions."""

    store: CheckpointStoreSpec = Field(description="Object store for checkpoints.")
    every_steps: Annotated[int, Field(ge=1, le=10**7)] = Field(
        default=200, description="Save a checkpoint every N optimizer steps (and on SIGTERM)."
    )
    keep: Annotated[int, Field(ge=1, le=100)] = Field(
        default=3,
        description="Checkpoints kept; the latest verified one and the best one are never deleted.",
    )
    verify_restore: bool = Field(
        default=True,
        description="Restore each checkpoint into a fresh model and compare a fingerprint before use.",
    )


# ---------------------------------------------------------------------------------------------
# spec.validation


class HeldOutScenario(_Model):
    """A prompt with an expected answer, checked against the baseline after each evaluation."""

    prompt: Text = Field(description="Prompt given to the model.")
    expect: Text = Field(description="Text the answer must contain.")


class ValidationSpec(_Model):
    """Checks run during training beyond the validation loss."""

    every_epoch: bool = Field(default=True, description="Evaluate at the end of every epoch.")
    prompts: Annotated[list[Text], Field(max_length=32)] = Field(
        default_factory=list, description="Realistic prompts generated from each epoch, for a human to read."
    )
    held_out_scenarios: Annotated[list[HeldOutScenario], Field(max_length=64)] = Field(
        default_factory=list, description="Prompts with expected answers (the predictions diagnostic)."
    )
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        default=None,
        description=(
            "Longest generation when scoring answers, scenarios and prompts. Unset: the longest reference "
            "answer of the test split in the model's tokens plus a quarter (at least 8), at most 256; for "
            "speech, the longest transcript, at most the decoder's max_target_positions."
        ),
    )
    max_generation_samples: Annotated[int, Field(ge=1, le=10000)] = Field(
        default=64,
        description="Test examples scored by generation (exact_match, token_f1, rougeL; wer for speech).",
    )


# ---------------------------------------------------------------------------------------------
# spec.output


class OutputSpec(_Model):
    """The final artifact: the adapter (lora, qlora) or the full model, with the tokenizer, the prompt
    template, the config, the data report, baseline and final metrics and a model card (README.md)."""

    merge_adapter: bool = Field(
        default=False,
        description=(
            "lora and qlora: also save the base model with the trained adapter merged in, as safetensors "
            "shards under final/merged/, which loads without peft. qlora merges into the base loaded in "
            "its compute dtype, not the 4-bit one. The merge runs on CPU and needs memory for one copy of "
            "the base model in that dtype (see resources.memory); a failed merge keeps the adapter. Not "
            "allowed with method.type full (its artifact is already the whole model); ignored when method "
            "auto resolves to full."
        ),
    )


# ---------------------------------------------------------------------------------------------
# spec.env


class SecretKeySelector(_Model):
    """A key of a Secret in the job's namespace."""

    name: SecretName = Field(description="Secret name.")
    key: SecretKey = Field(description="Key within the Secret.")


class EnvVar(_Model):
    """An environment variable for the trainer. Names containing KEY, TOKEN, SECRET, PASSWORD or
    CREDENTIAL must use secretKeyRef: a literal value would be visible to anyone who can read the job."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "has(self.value) != has(self.secretKeyRef)",
                "spec.env entries need exactly one of value or secretKeyRef",
                messageExpression="'spec.env ' + self.name + ': set exactly one of value or secretKeyRef'",
            ),
            _cel(
                f"!has(self.value) || !self.name.matches('{SECRET_LOOKING_RE2}')",
                "spec.env entry looks like a secret: use secretKeyRef instead of value",
                messageExpression="'spec.env ' + self.name + ' looks like a secret (name contains KEY, "
                "TOKEN, SECRET, PASSWORD or CREDENTIAL): store it in a Secret and use secretKeyRef "
                "instead of value'",
                fieldPath=".value",
                reason="FieldValueForbidden",
            ),
            _cel(
                f"!(self.name in {list(RESERVED_ENV_NAMES)!r})",
                "spec.env sets a variable the operator sets itself",
                messageExpression="'spec.env ' + self.name + ' is set by the operator; choose another name'",
                fieldPath=".name",
                reason="FieldValueForbidden",
            ),
        )
    )

    name: Annotated[
        str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    ] = Field(description="Variable name.")
    value: Annotated[str, StringConstraints(max_length=4096)] | None = Field(
        default=None, description="Literal value; not allowed for secret-looking names."
    )
    secret_key_ref: SecretKeySelector | None = Field(
        default=None, description="Take the value from a Secret key (checked to exist before pods start)."
    )

    @model_validator(mode="after")
    def _secrets_by_reference(self) -> Self:
        if (self.value is None) == (self.secret_key_ref is None):
            raise ValueError(f"spec.env {self.name}: set exactly one of value or secretKeyRef")
        if self.value is not None and SECRET_LOOKING_NAME.search(self.name):
            raise ValueError(
                f"spec.env {self.name} looks like a secret (name contains KEY, TOKEN, SECRET, PASSWORD or "
                "CREDENTIAL): store it in a Secret and use secretKeyRef instead of value"
            )
        if self.name in RESERVED_ENV_NAMES:
            raise ValueError(f"spec.env {self.name} is set by the operator; choose another name")
        return self


# ---------------------------------------------------------------------------------------------
# spec


class Environment(StrEnum):
    """Where the cluster runs."""

    AUTO = "auto"
    CLOUD = "cloud"
    ONPREM = "onprem"


class FineTuneJobSpec(_Model):
    """A fine-tuning run: base model, data, method and the goal it is measured against."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.resources.nodes <= 1 || self.method.type == 'full'",
                "spec.resources.nodes above 1 needs spec.method.type full (DeepSpeed): set nodes: 1 "
                "or method.type: full",
                fieldPath=".resources.nodes",
            ),
            _cel(
                "self.dataset.format != 'audio' || self.method.type != 'qlora'",
                "spec.method.type qlora does not support dataset.format audio: use lora or full",
                fieldPath=".method.type",
            ),
            _cel(
                "!self.goal.heldOutTest || has(self.goal.testFile) || self.dataset.split.test > 0.0",
                "spec.goal.heldOutTest needs a test split: set spec.dataset.split.test above 0 "
                "or spec.goal.testFile",
                fieldPath=".dataset.split.test",
            ),
            _cel(
                "!self.output.mergeAdapter || self.method.type != 'full'",
                "spec.output.mergeAdapter is true with method.type full: full fine-tuning already saves "
                "the whole model, there is no adapter to merge; set output.mergeAdapter: false or "
                "method.type lora or qlora",
                fieldPath=".output.mergeAdapter",
                reason="FieldValueForbidden",
            ),
            _cel(
                "has(self.userId) == has(oldSelf.userId) && "
                "(!has(self.userId) || self.userId == oldSelf.userId)",
                "spec.userId is recorded when the job is created and cannot be added, removed or changed "
                "(fix: keep the recorded value)",
                fieldPath=".userId",
            ),
        )
    )

    goal: GoalSpec = Field(description="What the model should learn and how success is measured.")
    model: ModelSpec = Field(
        description="The base model. Immutable once the job exists.",
        json_schema_extra=_immutable("model"),
    )
    dataset: DatasetSpec = Field(
        description="Training data and its preparation. Immutable once the job exists.",
        json_schema_extra=_immutable("dataset"),
    )
    method: MethodSpec = _defaulted_object(
        "Fine-tuning method (default auto). Immutable once the job exists.",
        MethodSpec,
        **_immutable("method"),
    )
    hyperparameters: HyperparametersSpec = _defaulted_object("Optimization settings.", HyperparametersSpec)
    resources: ResourcesSpec = _defaulted_object("GPUs, nodes and placement.", ResourcesSpec)
    environment: Environment = Field(
        default=Environment.AUTO,
        description=(
            "cloud or onprem (passed to the trainer as IS_CLOUD, and used by method auto). auto: the "
            "operator's setting, else detected from cloud-provider node labels."
        ),
    )
    checkpoints: CheckpointsSpec = Field(description="Checkpoint store and schedule.")
    validation: ValidationSpec = _defaulted_object(
        "Prompts and scenarios checked during training.", ValidationSpec
    )
    output: OutputSpec = _defaulted_object(
        "The final artifact: merged weights on request (lora, qlora); a model card always.", OutputSpec
    )
    env: Annotated[list[EnvVar], Field(max_length=MAX_ENV)] = Field(
        default_factory=list,
        description=(
            "Extra environment variables for the trainer. Secret-looking names (KEY, TOKEN, SECRET, "
            "PASSWORD, CREDENTIAL) must use secretKeyRef; every referenced Secret key must exist "
            "before pods start."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    suspend: bool = Field(
        default=False,
        description="true: checkpoint and stop the pods; false again: resume from the checkpoint.",
    )
    backoff_limit: Annotated[int, Field(ge=0, le=100)] = Field(
        default=3,
        description=(
            "Failed attempts tolerated before the job fails (with several nodes, a lost pod fails its "
            "peers too, so the Job allows this many per node); preemption and eviction do not count."
        ),
    )
    active_deadline_seconds: Annotated[int, Field(ge=60)] | None = Field(
        default=None, description="Wall-clock limit for the whole run, in seconds."
    )
    termination_grace_period_seconds: Annotated[int, Field(ge=30, le=7200)] = Field(
        default=300,
        description="Time a pod gets after SIGTERM to save and upload a checkpoint before it is killed.",
    )
    resume_from: Annotated[str, StringConstraints(max_length=1024, pattern=r"^(latest|s3://\S+)$")] | None = (
        Field(
            default=None,
            description="Start from a checkpoint: latest (this job's newest verified one) or an s3:// URI.",
        )
    )
    user_id: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = Field(
        default=None,
        description=(
            "The user the job runs for, passed to the trainer as USER_ID. With the operator's "
            "admission webhook (the chart's default) it is recorded from the creating request's "
            "identity and a different value is refused; without it the client sets it. Immutable."
        ),
    )

    @model_validator(mode="after")
    def _cross_field(self) -> Self:
        if self.resources.nodes > 1 and self.method.type != MethodType.FULL:
            raise ValueError(
                f"spec.resources.nodes is {self.resources.nodes}: more than one node needs "
                "spec.method.type full (DeepSpeed); set resources.nodes: 1 or method.type: full"
            )
        if self.dataset.format == DatasetFormat.AUDIO and self.method.type == MethodType.QLORA:
            raise ValueError(
                "spec.method.type qlora does not support spec.dataset.format audio: "
                "use method.type lora or full"
            )
        if self.output.merge_adapter and self.method.type == MethodType.FULL:
            raise ValueError(
                "spec.output.mergeAdapter is true with method.type full: full fine-tuning already saves "
                "the whole model, there is no adapter to merge; set output.mergeAdapter: false or "
                "method.type lora or qlora"
            )
        if self.goal.held_out_test and self.goal.test_file is None and self.dataset.split.test <= 0:
            raise ValueError(
                "spec.goal.heldOutTest is true but spec.dataset.split.test is 0: set split.test above 0 "
                "or spec.goal.testFile"
            )
        return self


# ---------------------------------------------------------------------------------------------
# status


class Phase(StrEnum):
    """Where the job is in its life."""

    PENDING = "Pending"
    VALIDATING = "Validating"
    PREPARING = "Preparing"
    BASELINE = "Baseline"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ConditionStatus(StrEnum):
    """Condition truth value."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Model):
    """One aspect of the job's state, in the standard Kubernetes condition shape."""

    type: Annotated[str, StringConstraints(min_length=1, max_length=316)] = Field(
        description="Condition type, for example SpecValid, SecretsReady, MemoryFits, PredictionsHealthy."
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=r"^[A-Za-z]\w*$")] = (
        Field(description="One CamelCase word for machines.")
    )
    message: Annotated[str, StringConstraints(max_length=32768)] = Field(
        description="What happened and what to do, for people."
    )
    observed_generation: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="metadata.generation of the spec this condition was computed from."
    )
    last_transition_time: datetime = Field(description="When status last changed.")


class ResolvedMethodType(StrEnum):
    """The method actually used."""

    LORA = "lora"
    QLORA = "qlora"
    FULL = "full"


class MethodStatus(_Model):
    """The method chosen and why."""

    type: ResolvedMethodType = Field(description="lora, qlora or full.")
    reason: Annotated[str, StringConstraints(max_length=1024)] = Field(
        description="Why this method, in words."
    )
    deepspeed_stage: Literal[2, 3] | None = Field(default=None, description="ZeRO stage, for full.")


class SplitCounts(_Model):
    """Examples per split."""

    train: Annotated[int, Field(ge=0)] = Field(default=0, description="Training examples.")
    validation: Annotated[int, Field(ge=0)] = Field(default=0, description="Validation examples.")
    test: Annotated[int, Field(ge=0)] = Field(default=0, description="Test examples.")


class DataReport(_Model):
    """What data preparation did, in counts."""

    raw: Annotated[int, Field(ge=0)] = Field(default=0, description="Examples read.")
    duplicates_removed: Annotated[int, Field(ge=0)] = Field(
        default=0, description="Exact duplicates removed."
    )
    near_duplicates_removed: Annotated[int, Field(ge=0)] = Field(
        default=0, description="Near duplicates removed."
    )
    boilerplate_lines_removed: Annotated[int, Field(ge=0)] = Field(
        default=0, description="Boilerplate lines removed."
    )
    examples: Annotated[int, Field(ge=0)] = Field(default=0, description="Examples after cleaning.")
    tokens: Annotated[int, Field(ge=0)] = Field(default=0, description="Tokens after tokenization.")
    chunks: Annotated[int, Field(ge=0)] = Field(default=0, description="Training sequences after chunking.")
    truncated: Annotated[int, Field(ge=0)] = Field(default=0, description="Examples cut at maxTokens.")
    bad_examples_dropped: Annotated[int, Field(ge=0)] = Field(
        default=0, description="Examples that cannot be trained on, left out (see badExampleReasons)."
    )
    bad_example_reasons: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        description=(
            "Examples dropped per reason: emptyAnswer, answerTruncated, noAnswerTokens, roundTripChanged."
        ),
    )
    split: SplitCounts = Field(default_factory=SplitCounts, description="Examples per split.")


class ProgressStatus(_Model):
    """Training progress, as last reported by the trainer."""

    step: Annotated[int, Field(ge=0)] = Field(default=0, description="Optimizer steps done.")
    total_steps: Annotated[int, Field(ge=0)] = Field(default=0, description="Optimizer steps planned.")
    epoch: Annotated[float, Field(ge=0)] = Field(default=0.0, description="Epochs done (fractional).")
    loss: float | None = Field(default=None, description="Latest training loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="Training throughput."
    )
    eta_seconds: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="Estimated seconds to the end of training."
    )
    percent: Annotated[int, Field(ge=0, le=100)] | None = Field(
        default=None, description="step / totalSteps as a whole percentage."
    )
    summary: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        default=None, description='Progress for people, for example "44% (400/900)".'
    )


class RanksStatus(_Model):
    """The trainer processes of the run: one per GPU in each pod."""

    world_size: Annotated[int, Field(ge=1)] = Field(description="Processes in all pods.")
    per_pod: Annotated[int, Field(ge=1)] = Field(description="Processes in each pod (its GPUs).")
    pods: Annotated[int, Field(ge=1)] = Field(description="Pods (resources.nodes).")


class CheckpointStatus(_Model):
    """The latest checkpoint."""

    uri: Annotated[str, StringConstraints(max_length=2048)] = Field(description="Where it is stored.")
    step: Annotated[int, Field(ge=0)] = Field(description="Optimizer step it was saved at.")
    verified: bool = Field(default=False, description="Restored and fingerprint-checked.")
    time: datetime | None = Field(default=None, description="When it was committed.")


class CheckpointProblemStatus(_Model):
    """A checkpoint the trainer did not use, and why."""

    uri: Annotated[str, StringConstraints(max_length=2048)] = Field(description="The checkpoint.")
    problem: Annotated[str, StringConstraints(max_length=32)] = Field(
        description="skipped (corrupt or incomplete), invalid (failed verification) or upload_failed."
    )
    reason: Annotated[str, StringConstraints(max_length=1024)] = Field(description="What was wrong.")


class PredictionCheck(_Model):
    """One predictions-diagnostic check."""

    name: Annotated[str, StringConstraints(max_length=128)] = Field(description="Check name.")
    passed: bool = Field(description="Whether it passed.")


class PredictionsStatus(_Model):
    """Predictions diagnostic: fixed prompts checked for empty, degenerate or wrong answers."""

    passed: Annotated[int, Field(ge=0)] = Field(default=0, description="Checks passed.")
    failed: Annotated[int, Field(ge=0)] = Field(default=0, description="Checks failed.")
    checks: Annotated[list[PredictionCheck], Field(max_length=256)] = Field(
        default_factory=list, description="Individual checks."
    )


SampleText = Annotated[str, StringConstraints(max_length=512)]


class SampleStatus(_Model):
    """One held-out test example: what the base model and the fine-tuned model answered."""

    prompt: SampleText = Field(description="The example's last user message.")
    reference: SampleText = Field(description="The answer in the test data.")
    baseline: SampleText | None = Field(default=None, description="The base model's answer.")
    final: SampleText | None = Field(default=None, description="The fine-tuned model's answer.")


MetricValues = Annotated[dict[MetricName, float], Field(max_length=64)]


class FineTuneJobStatus(_Model):
    """What the job is doing and what it found. Written by the operator; progress fields come from the
    trainer's reports."""

    phase: Phase | None = Field(
        default=None,
        description="Pending, Validating, Preparing, Baseline, "
        "Training, Evaluating, Suspended, Succeeded or Failed.",
    )
    message: Annotated[str, StringConstraints(max_length=4096)] | None = Field(
        default=None, description="The latest human-readable summary."
    )
    conditions: Annotated[list[Condition], Field(max_length=32)] = Field(
        default_factory=list,
        description="SpecValid, SecretsReady, MemoryFits, DataSufficient, PredictionsHealthy, Complete...",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    method: MethodStatus | None = Field(default=None, description="The method used and why.")
    ranks: RanksStatus | None = Field(default=None, description="The trainer processes, as started.")
    data: DataReport | None = Field(default=None, description="Data preparation report.")
    baseline: MetricValues | None = Field(
        default=None, description="Base model metrics on the test set, before training."
    )
    progress: ProgressStatus | None = Field(default=None, description="Training progress.")
    checkpoint: CheckpointStatus | None = Field(default=None, description="Latest checkpoint.")
    checkpoint_problems: Annotated[list[CheckpointProblemStatus], Field(max_length=5)] | None = Field(
        default=None,
        description="The latest checkpoints that were not used (corrupt, unverified, not stored).",
    )
    final: MetricValues | None = Field(default=None, description="Fine-tuned model metrics on the test set.")
    predictions: PredictionsStatus | None = Field(default=None, description="Predictions diagnostic.")
    samples: Annotated[list[SampleStatus], Field(max_length=8)] | None = Field(
        default=None, description="The first held-out test examples, answered before and after training."
    )
    restarts: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Times training was restarted (crash, preemption, suspend, rotation)."
    )
    secrets_hash: Annotated[str, StringConstraints(max_length=128)] | None = Field(
        default=None, description="Hash of the referenced Secrets' versions the current pods started with."
    )
    launch_time: datetime | None = Field(
        default=None,
        description="When the operator launched the job (created its Job); from then on only "
        "spec.suspend applies.",
    )
    start_time: datetime | None = Field(default=None, description="When the first pod started.")
    completion_time: datetime | None = Field(default=None, description="When the job finished.")
    observed_generation: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="metadata.generation the operator last acted on."
    )


def parse_spec(spec: Any) -> FineTuneJobSpec:
    """Validate a raw spec (a dict from the API server) into the model."""
    return FineTuneJobSpec.model_validate(spec)
