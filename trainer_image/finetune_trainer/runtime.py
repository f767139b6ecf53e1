"""Runtime diagnostics: flags, library versions, device, secrets present (names only), seeds."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
from collections.abc import Mapping
from typing import Any

from finetune_trainer.config import TrainerConfig
from finetune_trainer.distributed import SINGLE, Rendezvous
from finetune_trainer.redact import secret_names

log = logging.getLogger(__name__)
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed")
ALWAYS_REQUIRED_ENV = ("JOB_ID",)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "cuda": None, "gpus": []}
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"device": "cuda", "cuda": torch.version.cuda, "gpus": names}


def environment_info() -> dict[str, Any]:
    """Written as environment.json next to checkpoints and the final artifact."""
    return {"versions": library_versions(), **device_info()}


def runtime_flags(
    config: TrainerConfig, env: Mapping[str, str], rendezvous: Rendezvous = SINGLE
) -> dict[str, str]:
    """Bounded, non-secret values; also the labels of the runtime info metric."""
    return {
        "is_cloud": env.get("IS_CLOUD", str(config.environment.is_cloud).lower()),
        "user_id": env.get("USER_ID", ""),
        "job_id": env.get("JOB_ID", config.job.uid),
        "method": config.method.type,
        "world_size": str(rendezvous.world_size),
        "processes_per_pod": str(rendezvous.per_pod),
        "rank": str(rendezvous.rank),
        "seed": str(config.hyperparameters.seed),
    }


def secrets_presence(config: TrainerConfig, env: Mapping[str, str]) -> dict[str, str]:
    """'set' or 'missing' for each secret-looking variable: never its value."""
    names = set(secret_names(env)) | {n for n in config.required_env if n in secret_names({n: ""})}
    return {name: "set" if env.get(name) else "missing" for name in sorted(names)}


def missing_env(config: TrainerConfig, env: Mapping[str, str]) -> list[str]:
    return [name for name in (*ALWAYS_REQUIRED_ENV, *config.required_env) if not env.get(name)]


def log_startup(
    config: TrainerConfig, env: Mapping[str, str] | None = None, rendezvous: Rendezvous = SINGLE
) -> dict[str, str]:
    """One structured start-up line; returns the flags."""
    env = os.environ if env is None else env
    flags = runtime_flags(config, env, rendezvous)
    line = {
        "event": "startup",
        "job": f"{config.job.namespace}/{config.job.name}",
        "flags": flags,
        "versions": library_versions(),
        **device_info(),
        "secrets": secrets_presence(config, env),
    }
    log.info("%s", json.dumps(line, sort_keys=True))
    return flags


def set_seeds(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)
