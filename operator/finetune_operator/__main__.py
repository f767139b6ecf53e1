"""python -m finetune_operator: runs the operator (in a pod, or against the current kubeconfig)."""

from __future__ import annotations

import asyncio
import logging

import kopf

from finetune_operator import handlers  # noqa: F401  (registers the handlers)
from finetune_operator.settings import OperatorSettings


def main() -> None:
    settings = OperatorSettings()
    # kopf owns the log format (one line per record, with the object it concerns).
    kopf.configure(verbose=settings.log_level == "DEBUG")
    logging.getLogger().setLevel(settings.log_level)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            liveness_endpoint=liveness,
        )
    )


if __name__ == "__main__":
    main()
