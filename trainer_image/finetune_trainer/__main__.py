"""`python -m finetune_trainer --config PATH`: validate, diagnose, train, exit with a contract code.

The config is validated before torch or transformers are imported, so a bad config
fails in well under a second with one line per bad field. SIGTERM is handled from the first line
(see `termination`): outside training the run stops within seconds and exits 76.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from finetune_trainer import termination
from finetune_trainer.config import (
    CONFIG_PATH_ENV,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    TrainerConfig,
    load_config,
)
from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.redact import RedactingFilter, redact

if TYPE_CHECKING:
    from finetune_trainer.distributed import Rendezvous
    from finetune_trainer.reporting import ProgressReporter, TrainerMetrics

log = logging.getLogger("finetune_trainer")
PREEMPTED = (ExitCode.PREEMPTED_CHECKPOINTED, ExitCode.PREEMPTED_OUTSIDE_TRAINING)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Ranks of one pod share its log: each line says whose it is.
    launched = "LOCAL_RANK" in os.environ  # by the launcher: one of several processes of the pod
    rank = f"rank {os.environ.get('RANK', '?')} " if launched else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {rank}%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer", description=__doc__)
    parser.add_argument(
        "--config",
        default=os.environ.get(CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH),
        help=f"trainer config JSON (default: ${CONFIG_PATH_ENV} or {DEFAULT_CONFIG_PATH})",
    )
    return parser.parse_args(argv)


def _invalid(messages: list[str]) -> ExitCode:
    log.error("invalid config:\n  %s", "\n  ".join(messages))
    return ExitCode.INVALID_CONFIG


def run_config(config: TrainerConfig) -> ExitCode:
    from finetune_trainer import runtime

    missing = runtime.missing_env(config, os.environ)
    if missing:
        return _invalid(
            [
                f"env {name}: not set (fix: set it on the trainer pod; the operator sets JOB_ID)"
                for name in missing
            ]
        )
    from finetune_trainer import distributed
    from finetune_trainer.reporting import ProgressReporter, TrainerMetrics

    try:
        rendezvous = distributed.rendezvous_from_env(os.environ, distributed.cuda_devices())
    except ConfigError as exc:
        return _invalid(exc.messages)
    distributed.hide_until_join(os.environ)
    distributed.select_gpu(rendezvous)
    metrics = TrainerMetrics(config.job.namespace, config.job.name)
    reporter = ProgressReporter(config, writes=rendezvous.is_main)  # one writer per job
    flags = runtime.log_startup(config, rendezvous=rendezvous)
    metrics.set_runtime(flags | runtime.library_versions())
    serves = rendezvous.local_rank == 0  # one /metrics port per pod
    if serves:
        metrics.serve(config.metrics_port)  # on $POD_IP when set
    code = train_and_report(config, metrics, reporter, rendezvous)
    if serves and code not in PREEMPTED:  # also when only another rank got the SIGTERM
        metrics.linger(config.metrics_linger_seconds)  # the pod's last values reach Prometheus
    return code


def train_and_report(
    config: TrainerConfig, metrics: TrainerMetrics, reporter: ProgressReporter, rendezvous: Rendezvous
) -> ExitCode:
    """The run's exit code; a failure is logged and reported in the job's status first."""
    from finetune_trainer.data.errors import DataError
    from finetune_trainer.methods.loading import MethodError
    from finetune_trainer.report_model import Phase
    from finetune_trainer.sink import CheckpointRestoreError, CheckpointStoreUnusableError, StoreRefusedError

    try:
        from finetune_trainer.train import run  # seconds of imports: a SIGTERM meanwhile is reported

        return run(config, metrics, reporter, rendezvous)
    except termination.Terminated:
        return stopped_outside_training(reporter)
    except (ConfigError, MethodError) as exc:
        code, messages = ExitCode.INVALID_CONFIG, getattr(exc, "messages", [str(exc)])
    except DataError as exc:
        code, messages = ExitCode.DATA_REFUSED, [str(exc)]
    except CheckpointRestoreError as exc:
        code, messages = ExitCode.CHECKPOINT_RESTORE_FAILED, [str(exc)]
    except StoreRefusedError as exc:  # the message names the store, the Secret and the fix
        code, messages = ExitCode.STORE_REFUSED, [str(exc)]
    except CheckpointStoreUnusableError as exc:  # credentials, bucket, endpoint: the message names the fix
        code, messages = ExitCode.FAILED, [f"checkpoint store unusable: {exc}"]
    except Exception as exc:
        log.exception("training failed unexpectedly")
        code, messages = ExitCode.FAILED, [f"unexpected error: {type(exc).__name__}: {exc}"]
    log.error("%s", "\n".join(messages))
    reporter.update(phase=Phase.FAILED, message=redact("\n".join(messages)), force=True)
    return code


def stopped_outside_training(reporter: ProgressReporter) -> ExitCode:
    phase = reporter.report.phase.value.lower()
    message = (
        f"stopped by SIGTERM in phase {phase}: nothing new to checkpoint; "
        "the next pod starts again from the last committed checkpoint"
    )
    log.warning("%s", message)
    reporter.update(message=message, force=True)
    return ExitCode.PREEMPTED_OUTSIDE_TRAINING


def main(argv: list[str] | None = None) -> int:
    from finetune_trainer import launcher

    try:
        plan = launcher.plan_from_env(os.environ)
    except ConfigError as exc:
        setup_logging()
        return int(_invalid(exc.messages))
    if plan is not None:  # several GPUs in this pod: one process for each
        setup_logging()
        return launcher.launch(plan, sys.argv[1:] if argv is None else argv)
    termination.stop_on_sigterm()  # first: a pod deleted while Python starts stops cleanly too
    try:
        setup_logging()
        args = parse_args(argv)
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            return int(_invalid(exc.messages))
        return int(run_config(config))
    except termination.Terminated:
        log.warning("stopped by SIGTERM while starting: nothing to checkpoint yet")
        return int(ExitCode.PREEMPTED_OUTSIDE_TRAINING)


if __name__ == "__main__":
    sys.exit(main())
