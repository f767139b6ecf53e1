"""Prometheus metrics and the progress report (ConfigMap or file). Reporting never stops training."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    start_http_server,
)

from finetune_trainer import termination
from finetune_trainer.config import TrainerConfig
from finetune_trainer.redact import redact
from finetune_trainer.report_model import PROGRESS_KEY, DataSummary, Predictions, TrainerReport

log = logging.getLogger(__name__)
LABELS = ("namespace", "job")
POD_IP_ENV = "POD_IP"  # the operator sets it from the pod's status.podIP
MAX_NOTICES = 5
REQUEST_TIMEOUT_S = 15.0  # a report write that takes longer is given up; the next one carries it
# From a LoRA adapter on a fast network to full weights of a large model on a slow one.
UPLOAD_SECONDS_BUCKETS = (0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)
LINGER_POLL_S = 0.2


class TrainerMetrics:
    """Metrics with `finetune_` prefix, units in names, labels namespace and job only (plus a bounded
    metric, check or device name)."""

    def __init__(self, namespace: str, job: str) -> None:
        self.registry = CollectorRegistry()
        self._labels = {"namespace": namespace, "job": job}
        self._server: Any = None
        r = self.registry
        self.train_loss = Gauge("finetune_train_loss", "Training loss", LABELS, registry=r)
        self.eval_loss = Gauge("finetune_eval_loss", "Validation loss", LABELS, registry=r)
        self.eval_metric = Gauge(
            "finetune_eval_metric_value", "Evaluation metric", (*LABELS, "metric", "split"), registry=r
        )
        self.learning_rate = Gauge("finetune_learning_rate", "Learning rate", LABELS, registry=r)
        self.step = Gauge("finetune_step", "Optimizer step", LABELS, registry=r)
        self.total_steps = Gauge("finetune_total_steps", "Planned optimizer steps", LABELS, registry=r)
        self.epoch = Gauge("finetune_epoch", "Fractional epoch", LABELS, registry=r)
        self.tokens_per_second = Gauge(
            "finetune_tokens_per_second", "Training throughput in tokens/s", LABELS, registry=r
        )
        self.samples_per_second = Gauge(
            "finetune_samples_per_second", "Training throughput in samples/s", LABELS, registry=r
        )
        self.gpu_memory = Gauge(
            "finetune_gpu_memory_allocated_bytes",
            "Peak GPU memory allocated",
            (*LABELS, "device"),
            registry=r,
        )
        self.gpu_memory_reserved = Gauge(
            "finetune_gpu_memory_reserved_bytes",
            "GPU memory held by PyTorch's caching allocator",
            (*LABELS, "device"),
            registry=r,
        )
        self.gpu_utilization = Gauge(
            "finetune_gpu_utilization_ratio",
            "Fraction of the last sample period a kernel ran on the GPU (NVML)",
            (*LABELS, "device"),
            registry=r,
        )
        self._gpu_utilization_works = True
        self._committed_step = 0
        self._checkpoint_metrics(r)
        self.data = Gauge("finetune_data_examples", "Data report counts", (*LABELS, "count"), registry=r)
        self.prediction_check = Gauge(
            "finetune_predictions_check_passed",
            "Predictions diagnostic check (1 passed)",
            (*LABELS, "check"),
            registry=r,
        )
        self.runtime = Info(
            "finetune_trainer_runtime", "Trainer runtime flags and versions", LABELS, registry=r
        )

    def _checkpoint_metrics(self, r: CollectorRegistry) -> None:
        self.upload_seconds = Histogram(
            "finetune_checkpoint_upload_duration_seconds",
            "Time to store a checkpoint's files and manifest",
            LABELS,
            buckets=UPLOAD_SECONDS_BUCKETS,
            registry=r,
        )
        self.uploaded_bytes = Counter(
            "finetune_checkpoint_uploaded_bytes", "Bytes of committed checkpoint files", LABELS, registry=r
        )
        for family in (self.upload_seconds, self.uploaded_bytes):
            self.labels(family)  # at 0 from the start, so increase() counts the first upload
        # The operator also serves finetune_checkpoint_last_verified_step (from the job's status);
        # both say the same, so `max by (namespace, job)` combines them.
        self.committed_step = Gauge(
            "finetune_checkpoint_last_committed_step",
            "Step of the last committed checkpoint",
            LABELS,
            registry=r,
        )
        self.committed_at = Gauge(
            "finetune_checkpoint_last_committed_timestamp_seconds",
            "When the last checkpoint's manifest was written (Unix time)",
            LABELS,
            registry=r,
        )
        self.verified_step = Gauge(
            "finetune_checkpoint_last_verified_step",
            "Step of the last verified checkpoint",
            LABELS,
            registry=r,
        )
        self.verified_at = Gauge(
            "finetune_checkpoint_last_verified_timestamp_seconds",
            "When the last checkpoint passed its restore check (Unix time)",
            LABELS,
            registry=r,
        )

    def labels(self, family: Any, /, **extra: str) -> Any:
        return family.labels(**self._labels, **extra)

    def set_runtime(self, info: Mapping[str, str]) -> None:
        self.runtime.labels(**self._labels).info(dict(info))

    def set_data(self, summary: DataSummary) -> None:
        counts = summary.model_dump(exclude={"split", "bad_example_reasons"})
        counts |= {f"split_{k}": v for k, v in summary.split.model_dump().items()}
        for name, value in counts.items():
            self.labels(self.data, count=name).set(value)

    def set_eval(self, metrics: Mapping[str, float], split: str) -> None:
        for name, value in metrics.items():
            if math.isfinite(value):
                self.labels(self.eval_metric, metric=name, split=split).set(value)

    def set_predictions(self, predictions: Predictions) -> None:
        for check in predictions.checks:
            self.labels(self.prediction_check, check=check.name).set(1.0 if check.passed else 0.0)

    def checkpoint_committed(self, step: int, upload_seconds: float, upload_bytes: int) -> None:
        self.labels(self.upload_seconds).observe(upload_seconds)
        self.labels(self.uploaded_bytes).inc(upload_bytes)
        self.labels(self.committed_step).set(step)
        self.labels(self.committed_at).set_to_current_time()
        self._committed_step = step

    def checkpoint_verified(self, step: int | None) -> None:
        """`step` None: the final artifact, committed with the last step."""
        self.labels(self.verified_step).set(self._committed_step if step is None else step)
        self.labels(self.verified_at).set_to_current_time()

    def set_gpu_usage(self) -> None:
        """Memory and utilization per visible GPU; nothing at all without CUDA (no fake zeros)."""
        import torch

        if not torch.cuda.is_available():
            return
        for i in range(torch.cuda.device_count()):
            device = str(i)
            self.labels(self.gpu_memory, device=device).set(torch.cuda.max_memory_allocated(i))
            self.labels(self.gpu_memory_reserved, device=device).set(torch.cuda.memory_reserved(i))
            self._set_utilization(torch, i)

    def _set_utilization(self, torch: Any, index: int) -> None:
        if not self._gpu_utilization_works:
            return
        try:
            percent = torch.cuda.utilization(index)
        except Exception as exc:  # no pynvml in the image, or no NVML driver library
            self._gpu_utilization_works = False
            log.info("GPU utilization is not exported: %s", exc)
            return
        self.labels(self.gpu_utilization, device=str(index)).set(percent / 100)

    def serve(self, port: int, env: Mapping[str, str] | None = None) -> Any:
        """Serve /metrics on the pod IP (pods may share a host's network), else on every address.
        Returns the HTTP server, or None when the port is 0."""
        if not port:
            return None
        env = os.environ if env is None else env
        address = env.get(POD_IP_ENV, "").strip() or "0.0.0.0"  # noqa: S104 - no pod IP: all interfaces
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        log.info("metrics on %s port %d", address, port)
        self._server = server
        return server

    def linger(self, seconds: float) -> None:
        """Keep /metrics up a while after the run, so one more scrape collects the final values.
        Skipped after SIGTERM, and a SIGTERM meanwhile ends it: the grace period is for checkpoints."""
        if self._server is None or seconds <= 0 or termination.requested():
            return
        termination.catch_sigterm()
        log.info("serving the final metrics for %gs before exiting", seconds)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not termination.requested():
            time.sleep(min(LINGER_POLL_S, max(0.0, deadline - time.monotonic())))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ProgressReporter:
    """Writes the TrainerReport to the job's progress ConfigMap, or to report.file.

    Writes are throttled except on phase changes; errors are logged and swallowed. Notices
    (problems that did not stop training, such as a skipped checkpoint) stay in every later message.
    The throttled writes of the training loop go through a writer thread, latest document first, so
    a slow API server never holds up a training step; forced ones (phases, the outcome) are written
    before `update` returns.
    """

    def __init__(self, config: TrainerConfig, min_interval_s: float = 10.0, writes: bool = True) -> None:
        """`writes=False` keeps the report in memory: ranks other than 0 of a multi-pod job."""
        self.report = TrainerReport()
        self._config_map = config.report.config_map if writes else ""
        self._namespace = config.report.namespace or config.job.namespace
        self._file = Path(config.report.file) if config.report.file and writes else None
        self._min_interval = min_interval_s
        self._last_write = 0.0
        self._last_phase = self.report.phase
        self._lock = threading.RLock()
        self._api: Any = None
        self.notices: list[str] = []
        self._message = ""  # the last message, without notices
        self._pending: str | None = None  # the newest document not written yet
        self._send_lock = threading.Lock()  # one write at a time, in order
        self._wake = threading.Event()
        self._writer: threading.Thread | None = None

    def update(self, force: bool = False, **fields: Any) -> None:
        with self._lock:
            if "message" in fields:
                self._message = fields["message"]
                fields["message"] = "; ".join(m for m in (self._message, *self.notices) if m)
            self.report = self.report.model_copy(update=fields)
            phase_changed = self.report.phase != self._last_phase
            if force or phase_changed:
                self._write(wait=True)
            elif time.monotonic() - self._last_write >= self._min_interval:
                self._write(wait=False)

    def notice(self, text: str) -> None:
        with self._lock:
            self.notices = [*self.notices, redact(text)][-MAX_NOTICES:]
            self.update(message=self._message, force=True)

    def _write(self, wait: bool) -> None:
        self.report.updated_at = TrainerReport().updated_at
        self._last_write, self._last_phase = time.monotonic(), self.report.phase
        document = self.report.to_json()
        if wait or not self._config_map:  # a local file is written at once
            with self._send_lock:
                self._pending = None  # older than this one
                self._send(document)
            return
        self._pending = document
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_behind, name="progress-report", daemon=True)
            self._writer.start()
        self._wake.set()

    def _write_behind(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._send_lock:
                document, self._pending = self._pending, None
                if document is not None:
                    self._send(document)

    def _send(self, document: str) -> None:
        try:
            if self._config_map:
                self._patch(document)
            if self._file:
                self._write_file(self._file, document)
        except Exception as exc:  # reporting must never kill training
            log.warning("could not write the progress report: %s", exc)

    @staticmethod
    def _write_file(path: Path, document: str) -> None:
        """Write then rename, so a reader never sees half a document."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.tmp")
        partial.write_text(document, encoding="utf-8")
        partial.replace(path)

    def _patch(self, document: str) -> None:
        if self._api is None:
            from kubernetes import client, config

            config.load_incluster_config()
            self._api = client.CoreV1Api()
        self._api.patch_namespaced_config_map(
            self._config_map,
            self._namespace,
            {"data": {PROGRESS_KEY: document}},
            _request_timeout=REQUEST_TIMEOUT_S,
        )
