"""`TrainerConfig`: the contract the operator renders and the trainer reads.

The operator writes it as camelCase JSON into a ConfigMap mounted at
`/etc/finetune/config.json`. Python code may build it with snake_case names.
This module must stay importable without torch: the operator imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

DEFAULT_CONFIG_PATH = "/etc/finetune/config.json"
CONFIG_PATH_ENV = "FINETUNE_CONFIG"

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]


class _Spec(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


# --- job identity and goal -------------------------------------------------------------------------------


class JobIdentity(_Spec):
    namespace: str = Field(min_length=1, description="namespace of the FineTuneJob")
    name: str = Field(min_length=1, description="name of the FineTuneJob")
    uid: str = Field(default="", description="metadata.uid of the FineTuneJob (also env JOB_ID)")


# scenario_pass_rate: share of validation.heldOutScenarios whose answer contains `expect`.
# wer: word error rate of transcriptions (dataset.format: audio).
TaskMetric = Literal[
    "eval_loss", "perplexity", "exact_match", "token_f1", "rougeL", "scenario_pass_rate", "wer"
]


class SuccessCriterion(_Spec):
    """One rule comparing the final metric with the baseline or a fixed bound.

    `maxRegression`: final may be worse than baseline by at most this much (0.0: not worse).
    `minImprovement`: final must beat baseline by at least this much.
    `atLeast` / `atMost`: absolute bounds on the final value.
    """

    metric: TaskMetric
    max_regression: float | None = Field(default=None, ge=0.0)
    min_improvement: float | None = None
    at_least: float | None = None
    at_most: float | None = None
    on_failure: Literal["fail", "warn"] = Field(
        default="fail", description="fail: exit 3 when unmet; warn: record it and succeed"
    )

    @model_validator(mode="after")
    def _one_rule(self) -> SuccessCriterion:
        rules = [self.max_regression, self.min_improvement, self.at_least, self.at_most]
        if sum(r is not None for r in rules) != 1:
            raise ValueError(
                "set exactly one of maxRegression, minImprovement, atLeast, atMost "
                f"for metric {self.metric!r}"
            )
        return self


def _default_metrics() -> list[TaskMetric]:
    return ["eval_loss", "perplexity", "exact_match"]


class Goal(_Spec):
    task: str = Field(default="", description="what the model should do, in the user's words")
    metrics: list[TaskMetric] = Field(default_factory=_default_metrics)
    held_out_test: bool = Field(default=True, description="evaluate base and tuned model on a test split")
    success_criteria: list[SuccessCriterion] = Field(default_factory=list)


# --- model and data --------------------------------------------------------------------------------------


class ModelSource(_Spec):
    source: str = Field(min_length=1, description="local path, s3://bucket/path or hf://org/name")
    revision: str | None = Field(default=None, description="hub commit or tag; pin it for reproducibility")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class Preprocessing(_Spec):
    normalize: bool = Field(default=True, description="Unicode NFC, mojibake repair (ftfy), whitespace")
    strip_boilerplate: bool = True
    dedupe: Literal["none", "exact", "exact+near"] = "exact+near"
    near_duplicate_threshold: float = Field(default=0.8, gt=0.0, le=1.0, description="MinHash Jaccard")
    repeated_line_min_docs: PositiveInt = Field(
        default=3, description="a line seen in at least this many documents is boilerplate"
    )
    repeated_line_min_fraction: float = Field(
        default=0.3, gt=0.0, le=1.0, description="...and in at least this fraction of documents"
    )
    warn_duplicate_share: float = Field(
        default=0.2, ge=0.0, le=1.0, description="warn when more than this share of examples are duplicates"
    )
    max_duplicate_share: float = Field(
        default=0.5, ge=0.0, le=1.0, description="refuse the data above this share of duplicates (1.0: never)"
    )
    max_bad_example_share: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description=(
            "examples that cannot be trained on (empty answer, answer cut off by maxTokens, tokenizer round "
            "trip fails) are dropped and counted; refuse the data when more than this share are"
        ),
    )


class Chunking(_Spec):
    max_tokens: int = Field(default=1024, ge=16, le=1_048_576, description="never beyond the model context")
    packing: bool = True


class Split(_Spec):
    validation: Fraction = 0.05
    test: Fraction = 0.05
    seed: int = 42

    @model_validator(mode="after")
    def _room_for_training(self) -> Split:
        if self.validation + self.test >= 0.9:
            raise ValueError(
                f"validation + test = {self.validation + self.test:.2f} leaves too little for training; "
                "keep their sum below 0.9"
            )
        return self


class Audio(_Spec):
    """Speech data: one clip per record with its transcript (see finetune_trainer.data.audio)."""

    sample_rate: PositiveInt = Field(
        default=16_000, description="the model's rate; clips at other rates are resampled to it"
    )
    chunk_seconds: float = Field(
        default=30.0,
        gt=0.0,
        le=30.0,
        description="Whisper reads 30 s windows; longer clips (or beyond the model's window) are left out",
    )
    audio_column: str = Field(default="audio", description="clip path, relative to the dataset file")
    text_column: str = "text"


ChatRole = Literal["system", "user", "assistant"]


def _default_role_map() -> dict[str, ChatRole]:
    return {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class Dataset(_Spec):
    source: str = Field(min_length=1, description="local file or directory, s3://bucket/key or hub id")
    test_source: str | None = Field(default=None, description="explicit held-out test file")
    format: Literal["alpaca", "sharegpt", "text", "audio"] = "alpaca"
    hub_split: str = "train"
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    chunking: Chunking = Field(default_factory=Chunking)
    split: Split = Field(default_factory=Split)
    train_on_prompt: bool = Field(default=False, description="false: loss only on responses")
    role_map: dict[str, ChatRole] = Field(
        default_factory=_default_role_map,
        description="sharegpt `from` values mapped to chat roles",
    )
    audio: Audio = Field(default_factory=Audio)


# --- method ----------------------------------------------------------------------------------------------


class Lora(_Spec):
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class Quantization(_Spec):
    bits: Literal[4] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class DeepSpeed(_Spec):
    enabled: bool = False
    stage: Literal[2, 3] = 2
    offload: Literal["none", "optimizer", "optimizer+params"] = Field(
        default="none", description="offload to CPU memory; params offload needs stage 3"
    )

    @model_validator(mode="after")
    def _params_offload_needs_stage3(self) -> DeepSpeed:
        if self.offload == "optimizer+params" and self.stage != 3:
            raise ValueError("offload 'optimizer+params' needs stage 3; set stage: 3 or offload: optimizer")
        return self


class Method(_Spec):
    type: Literal["lora", "qlora", "full"]
    reason: str = Field(default="", description="why the operator chose this method")
    lora: Lora = Field(default_factory=Lora)
    quantization: Quantization = Field(default_factory=Quantization)
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed)
    allow_small_data_full_fine_tune: bool = False


class Hyperparameters(_Spec):
    epochs: float = Field(default=3.0, gt=0.0)
    learning_rate: float = Field(default=2e-4, gt=0.0, lt=1.0)
    batch_size: PositiveInt = 4
    gradient_accumulation: PositiveInt = 1
    seed: int = 42
    max_steps: PositiveInt | None = Field(default=None, description="overrides epochs when set")
    warmup_ratio: Fraction = 0.03
    weight_decay: float = Field(default=0.0, ge=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    logging_steps: PositiveInt = 10
    eval_steps: PositiveInt | None = Field(default=None, description="unset: each epoch or more often")
    gradient_checkpointing: bool = False
    loss_spike_factor: float = Field(
        default=10.0, gt=1.0, description="stop when loss exceeds this multiple of its running minimum"
    )


class Environment(_Spec):
    is_cloud: bool = False


# --- checkpoints, validation, report ---------------------------------------------------------------------


class S3Store(_Spec):
    endpoint: str = Field(default="", description="empty: AWS; else an S3-compatible URL")
    region: str = ""
    bucket: str = ""
    prefix: str = ""
    path_style: bool = False
    checksum_mode: Literal["when_supported", "when_required"] = Field(
        default="when_required", description="when_required suits stores that reject newer checksums"
    )
    credentials_secret: str = Field(
        default="", description="the Secret the credentials come from, named in errors (never its values)"
    )


class Checkpoints(_Spec):
    store: S3Store = Field(default_factory=S3Store)
    every_steps: PositiveInt = 200
    keep: PositiveInt = 3
    verify_restore: bool = True
    resume_from: str | None = Field(default=None, description="'latest' or an s3:// checkpoint URI")


class Scenario(_Spec):
    prompt: str = Field(min_length=1)
    expect: str = Field(min_length=1, description="substring the answer must contain")


class Validation(_Spec):
    every_epoch: bool = True
    prompts: list[str] = Field(default_factory=list, description="generated and stored each epoch")
    held_out_scenarios: list[Scenario] = Field(default_factory=list)
    max_new_tokens: PositiveInt | None = Field(
        default=None,
        description=(
            "longest generation; unset: the longest held-out reference answer (speech: transcript) in "
            "the model's tokens plus a quarter (at least 8), at most 256 (speech: the decoder's "
            "max_target_positions)"
        ),
    )
    max_generation_samples: PositiveInt = Field(
        default=64, description="test examples scored by generation (exact_match, token_f1, rougeL)"
    )


class Output(_Spec):
    """The final artifact beyond the adapter or model: merged weights on request."""

    merge_adapter: bool = Field(
        default=False, description="lora, qlora: also save base + adapter merged, under final/merged/"
    )
    max_shard_size: str = Field(
        default="5GB",
        pattern=r"^[0-9]+(KB|MB|GB)$",
        description="largest safetensors file of the merged weights",
    )


class Report(_Spec):
    config_map: str | None = Field(default=None, description="ConfigMap that receives progress.json")
    namespace: str | None = Field(default=None, description="defaults to job.namespace")
    file: str | None = Field(default=None, description="write progress.json here when no ConfigMap")


class TrainerConfig(_Spec):
    job: JobIdentity
    goal: Goal = Field(default_factory=Goal)
    model: ModelSource
    dataset: Dataset
    method: Method
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    environment: Environment = Field(default_factory=Environment)
    checkpoints: Checkpoints = Field(default_factory=Checkpoints)
    validation: Validation = Field(default_factory=Validation)
    output: Output = Field(default_factory=Output)
    report: Report = Field(default_factory=Report)
    metrics_port: int = Field(default=9400, ge=0, le=65535, description="0 disables the metrics server")
    metrics_linger_seconds: float = Field(
        default=15.0,
        ge=0,
        le=600,
        description="after the run (not after SIGTERM), /metrics stays up this long: at least one scrape "
        "interval, so the final values are collected",
    )
    output_dir: str = Field(default="/workspace/output", min_length=1)
    required_env: list[str] = Field(default_factory=list, description="env var names that must be set")

    @model_validator(mode="after")
    def _method_fits_data(self) -> TrainerConfig:
        if self.dataset.format == "audio" and self.method.type == "qlora":
            raise ValueError("method.type qlora is not supported for format audio; use lora or full")
        if self.output.merge_adapter and self.method.type == "full":
            raise ValueError(
                "output.mergeAdapter: true with method.type full: there is no adapter to merge "
                "(fix: set output.mergeAdapter: false, or method.type lora or qlora)"
            )
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True)


# --- loading with user-facing errors ---------------------------------------------------------------------


class ConfigError(Exception):
    """An invalid config: one message per bad field, each with path, value and fix."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item.isidentifier():
            parts.append(("." if parts else "") + to_camel(item))
        else:  # a union member or dict key, e.g. "literal['all-linear']"
            parts.append(f"<{item}>")
    return "".join(parts) or "(root)"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_FIXES = {
    "missing": "add this field",
    "extra_forbidden": "remove this field or correct its spelling",
    "literal_error": "use one of the allowed values",
}


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "value_error":  # our validators already say what to do
        return str(error["msg"]).removeprefix("Value error, ")
    return f"{error['msg']} (fix: {_FIXES.get(kind, 'use a value that satisfies this')})"


def describe_errors(exc: ValidationError) -> list[str]:
    """Turn pydantic errors into one line per field: path, value, what is wrong, fix."""
    lines = []
    for error in exc.errors(include_url=False):
        path = _field_path(tuple(error["loc"]))
        value = "(missing)" if error["type"] == "missing" else _short(error.get("input"))
        lines.append(f"{path}: got {value}: {_message(error)}")
    return lines


def parse_config(data: Any) -> TrainerConfig:
    try:
        return TrainerConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None


def load_config(path: str | Path) -> TrainerConfig:
    """Read and validate a config file; raise ConfigError with user-facing messages."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [f"config file {str(file)!r}: cannot be read ({exc.strerror}) (fix: pass --config PATH)"]
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [f"config file {str(file)!r}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"]
        ) from None
    return parse_config(data)
