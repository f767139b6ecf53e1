"""Operator settings, from environment variables prefixed `FINETUNE_OPERATOR_` (set by the chart).

- FINETUNE_OPERATOR_ENVIRONMENT (auto): cloud, onprem, or auto (detect from node labels); used when a job
  says `environment: auto`.
- FINETUNE_OPERATOR_GPU_MEMORY_GIB (24): memory of one GPU, when a job's nodeSelector has no GPU-memory label.
- FINETUNE_OPERATOR_GPU_MEMORY_LABEL (nvidia.com/gpu.memory): node label with GPU memory in MiB, as set by
  NVIDIA GPU feature discovery.
- FINETUNE_OPERATOR_DEFAULT_MODEL_PARAMETERS (7B): parameter count assumed when
  spec.model.parameters is absent and the model's own files (config.json, safetensors header)
  cannot be read.
- FINETUNE_OPERATOR_MODEL_SIZE_LOOKUP (true): read the size of a model without spec.model.parameters
  from its files before launch; false skips it (air-gapped clusters), so the default is assumed.
- FINETUNE_OPERATOR_MODEL_SIZE_TIMEOUT (5s): limit of each request of that lookup.
- FINETUNE_OPERATOR_HUB_ENDPOINT (https://huggingface.co): the model hub, or a mirror of it, that
  hf:// models are read from.
- FINETUNE_OPERATOR_TRAINER_IMAGE (ghcr.io/finetune-dev/finetune-trainer:0.1.0): image of the training pods.
- FINETUNE_OPERATOR_TRAINER_IMAGE_PULL_POLICY (IfNotPresent): Always, IfNotPresent or Never.
- FINETUNE_OPERATOR_TRAINER_RUN_AS_USER (10001): non-root uid and gid of the training pods.
- FINETUNE_OPERATOR_TRAINER_CPU_PER_PROCESS (2): CPU request per trainer process when the spec sets none.
- FINETUNE_OPERATOR_TRAINER_METRICS_PORT (9400): the trainer's Prometheus port (container port `metrics`).
- FINETUNE_OPERATOR_TRAINER_SCRAPE_INTERVAL (15s): how often Prometheus scrapes trainer pods (the chart
  passes podMonitor.interval); a finished trainer keeps /metrics up this long, so its final values
  are scraped.
- FINETUNE_OPERATOR_NAMESPACES (empty: all namespaces): comma-separated namespaces to watch.
- FINETUNE_OPERATOR_SKIP_NAMESPACES (empty): with all namespaces watched, comma-separated namespaces
  (globs such as `team-x-*`) left to another operator, for example one a team runs for a trial;
  the operator then lists and watches namespaces and CRDs.
- FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE (empty: off): namespace of the Lease that lets one
  replica act at a time (every replica serves the webhook); FINETUNE_OPERATOR_LEADER_ELECTION_LEASE
  (finetune-operator) names it, FINETUNE_OPERATOR_LEADER_ELECTION_SECONDS (15) is its duration: a
  replica takes over that long after the leader last renewed.
- FINETUNE_OPERATOR_METRICS_PORT (8080): the operator's Prometheus endpoint (/metrics).
- FINETUNE_OPERATOR_HEALTH_PORT (8081): the operator's liveness endpoint (/healthz).
- FINETUNE_OPERATOR_WEBHOOK_PORT (0: off): HTTPS port of the admission webhook that records the creating
  user in spec.userId; FINETUNE_OPERATOR_WEBHOOK_CERT_DIR holds its tls.crt and tls.key.
- FINETUNE_OPERATOR_HEARTBEAT_NAMESPACE (empty: off): a watched namespace where the operator keeps a
  heartbeat ConfigMap; /healthz fails when its updates stop arriving through the watch.
- FINETUNE_OPERATOR_LOG_LEVEL (INFO): DEBUG, INFO, WARNING or ERROR.
- FINETUNE_OPERATOR_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS ({}): JSON object put on every trainer
  ServiceAccount (e.g. eks.amazonaws.com/role-arn for IAM roles for service accounts).
- FINETUNE_OPERATOR_TRAINER_NETWORK_POLICY (true), FINETUNE_OPERATOR_TRAINER_METRICS_FROM ([]): a
  NetworkPolicy per job that admits only the job's own pods, and on the metrics port the peers in
  this JSON list of NetworkPolicy peers (empty: any source).
- FINETUNE_OPERATOR_CHECKPOINT_ENDPOINT, _REGION, _PATH_STYLE, _CHECKSUM_MODE: the cluster's S3 store,
  used by jobs whose spec.checkpoints.store.endpoint is empty.
- FINETUNE_OPERATOR_CHECK_SECRETS (true), FINETUNE_OPERATOR_READ_NODES (true): what the operator's RBAC
  allows; when false it skips the secret check (pods then wait for missing secrets) or node detection.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from finetune_operator.api import Environment

# Prometheus' duration syntax, as in the chart's podMonitor.interval: 15s, 1m30s, 500ms.
UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
DURATION = re.compile(rf"(?:{DURATION_PART.pattern})+")


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FINETUNE_OPERATOR_", frozen=True, extra="ignore")

    environment: Environment = Field(
        default=Environment.AUTO, description="Environment used when a job says auto."
    )
    gpu_memory_gib: Annotated[float, Field(gt=0, le=4096)] = Field(
        default=24.0, description="Memory of one GPU in GiB, unless the job's nodeSelector says otherwise."
    )
    gpu_memory_label: str = Field(
        default="nvidia.com/gpu.memory", description="Node label with the GPU memory in MiB."
    )
    default_model_parameters: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?[KMBT]$")] = Field(
        default="7B",
        description="Parameter count assumed when spec.model.parameters is absent and the model's files "
        "cannot be read.",
    )
    model_size_lookup: bool = Field(
        default=True, description="Read a model's size from its config.json or safetensors header."
    )
    model_size_timeout: Annotated[float, Field(gt=0, le=60)] = Field(
        default=5.0, description="Seconds each request of the model-size lookup may take, or a duration: 5s."
    )
    hub_endpoint: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$")] = Field(
        default="https://huggingface.co", description="Model hub (or mirror) that hf:// models come from."
    )
    trainer_image: str = Field(
        default="ghcr.io/finetune-dev/finetune-trainer:0.1.0", description="Trainer image."
    )
    trainer_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy of the trainer container."
    )
    trainer_run_as_user: Annotated[int, Field(ge=1)] = Field(
        default=10001,
        description="Non-root user id (also group id) of the trainer; above 10000, clear of host users.",
    )
    trainer_cpu_per_process: Annotated[float, Field(gt=0, le=256)] = Field(
        default=2.0, description="CPU request per trainer process when spec.resources.cpu is unset."
    )
    trainer_metrics_port: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=9400, description="Port of the trainer's Prometheus endpoint."
    )
    trainer_scrape_interval: Annotated[float, Field(ge=0, le=300)] = Field(
        default=15.0,
        description="Seconds between scrapes of trainer pods; a Prometheus duration such as 15s.",
    )
    namespaces: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="Namespaces to watch; empty means all namespaces."
    )

    skip_namespaces: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="With all namespaces watched: namespaces (globs) left alone."
    )
    leader_election_namespace: str = Field(
        default="", description="Namespace of the leader-election Lease; empty: no election."
    )
    leader_election_lease: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")] = Field(
        default="finetune-operator", description="Name of the leader-election Lease."
    )
    leader_election_seconds: Annotated[float, Field(ge=3, le=300)] = Field(
        default=15.0, description="Lease duration: a replica takes over this long after the last renewal."
    )

    metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=8080, description="Port of the operator's /metrics endpoint; 0 disables it."
    )
    health_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=8081, description="Port of the operator's /healthz endpoint; 0 disables it."
    )
    webhook_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=0, description="HTTPS port of the admission webhook; 0 disables it."
    )
    webhook_cert_dir: str = Field(
        default="/etc/finetune-operator/webhook", description="Directory with the webhook's tls.crt/tls.key."
    )
    heartbeat_namespace: str = Field(
        default="", description="Watched namespace of the heartbeat ConfigMap; empty disables it."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of the operator."
    )

    trainer_service_account_annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations for every trainer ServiceAccount."
    )
    trainer_network_policy: bool = Field(
        default=True, description="A NetworkPolicy per job: only its own pods and the metrics scraper get in."
    )
    trainer_metrics_from: list[dict[str, Any]] = Field(
        default_factory=list,
        description="NetworkPolicy peers allowed to scrape trainer metrics (JSON); empty: any source.",
    )
    checkpoint_endpoint: str = Field(default="", description="Default S3 endpoint for checkpoints.")
    checkpoint_region: str = Field(default="", description="Default S3 region for checkpoints.")
    checkpoint_path_style: bool | None = Field(
        default=None, description="Path-style addressing for the default endpoint."
    )
    checkpoint_checksum_mode: Literal["when_required", "when_supported"] | None = Field(
        default=None, description="Checksum mode for the default endpoint."
    )
    check_secrets: bool = Field(default=True, description="Check referenced Secrets before launch.")
    read_nodes: bool = Field(default=True, description="Read node labels to detect the environment.")

    @field_validator(
        "trainer_scrape_interval", "model_size_timeout", "leader_election_seconds", mode="before"
    )
    @classmethod
    def _prometheus_duration(cls, value: object) -> object:
        if isinstance(value, str) and DURATION.fullmatch(value.strip()):
            return sum(int(n) * UNIT_SECONDS[unit] for n, unit in DURATION_PART.findall(value))
        return value  # a number of seconds; anything else fails float validation

    @field_validator("namespaces", "skip_namespaces", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _one_scope(self) -> OperatorSettings:
        if self.namespaces and self.skip_namespaces:
            raise ValueError(
                "FINETUNE_OPERATOR_SKIP_NAMESPACES applies only when all namespaces are watched "
                "(fix: leave FINETUNE_OPERATOR_NAMESPACES empty, or drop the skip list)"
            )
        return self

    def watched_namespaces(self) -> list[str]:
        """kopf's namespace patterns: the listed namespaces, or every namespace but the skipped."""
        if self.namespaces:
            return list(self.namespaces)
        if self.skip_namespaces:
            return [", ".join(f"!{glob}" for glob in self.skip_namespaces)]
        return []

    def skips(self, namespace: str) -> bool:
        """True for a namespace this operator leaves alone (the same rule as kopf's `!glob`)."""
        return not self.namespaces and any(fnmatch.fnmatchcase(namespace, g) for g in self.skip_namespaces)
