"""python -m finetune_operator: runs the operator (in a pod, or against the current kubeconfig)."""

from __future__ import annotations

import logging
import sys

import kopf

from finetune_operator import (
    handlers,  # noqa: F401  (registers the handlers)
    replicas,
)
from finetune_operator.settings import OperatorSettings


def main() -> None:
    settings = OperatorSettings()
    # kopf owns the log format (one line per record, with the object it concerns).
    kopf.configure(verbose=settings.log_level == "DEBUG")
    logging.getLogger().setLevel(settings.log_level)
    sys.exit(replicas.run(settings))


if __name__ == "__main__":
    main()
