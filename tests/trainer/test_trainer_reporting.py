"""The metrics server's address, GPU and checkpoint series, the last scrape after a run, and the
progress report's checkpoint fields and notices."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer import termination
from finetune_trainer.config import TrainerConfig
from finetune_trainer.report_model import CheckpointInfo
from finetune_trainer.reporting import ProgressReporter, TrainerMetrics
from finetune_trainer.sink import report_checkpoint_events


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def metrics() -> TrainerMetrics:
    m = TrainerMetrics("team-a", "bot")
    m.labels(m.step).set(7)
    return m


def test_metrics_bind_to_the_pod_ip_only(metrics: TrainerMetrics) -> None:
    # 127.0.0.2 stands in for the pod IP: another pod on the same host network uses 127.0.0.1.
    port = free_port()
    server = metrics.serve(port, env={"POD_IP": "127.0.0.2"})
    try:
        assert 'finetune_step{job="bot",namespace="team-a"} 7.0' in scrape("127.0.0.2", port)
        assert not reachable("127.0.0.1", port)
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_bind_every_address_without_a_pod_ip(metrics: TrainerMetrics) -> None:
    port = free_port()
    server = metrics.serve(port, env={})
    try:
        assert "finetune_step" in scrape("127.0.0.1", port)
        assert "finetune_step" in scrape("127.0.0.2", port)
    finally:
        server.shutdown()
        server.server_close()


def test_port_zero_serves_nothing(metrics: TrainerMetrics) -> None:
    assert metrics.serve(0, env={"POD_IP": "127.0.0.2"}) is None


@dataclass(frozen=True)
class Event:
    kind: str
    uri: str
    step: int | None
    reason: str = ""
    upload_seconds: float = 0.0
    upload_bytes: int = 0

    @property
    def info(self) -> CheckpointInfo:
        return CheckpointInfo(uri=self.uri, step=self.step or 0, verified=self.kind == "verified")


def reporter(tmp_path: Path) -> ProgressReporter:
    config = TrainerConfig.model_validate(
        {
            "job": {"namespace": "ns", "name": "bot"},
            "model": {"source": "m"},
            "dataset": {"source": "d.jsonl"},
            "method": {"type": "lora"},
            "report": {"file": str(tmp_path / "progress.json")},
        }
    )
    return ProgressReporter(config)


def written(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / "progress.json").read_text())
    return data


def test_checkpoint_events_reach_the_report(tmp_path: Path) -> None:
    report = reporter(tmp_path)
    handle = report_checkpoint_events(report)
    uri = "s3://ckpt/jobs/ns/bot/uid/checkpoints/step-"

    handle(Event("committed", uri + "20", 20))
    handle(Event("verified", uri + "20", 20))
    handle(Event("skipped", uri + "30", 30, "corrupt: model.safetensors: sha256 0a1b…, manifest says 9f8e…"))
    handle(Event("upload_failed", uri + "40", 40, "checkpoints.store: upload failed (timeout)"))
    report.update(message="training succeeded", force=True)

    document = written(tmp_path)
    assert document["checkpoint"] == {"uri": uri + "20", "step": 20, "verified": True}
    message = document["message"]
    assert message.startswith("training succeeded; ")
    assert f"checkpoint {uri}30 skipped: corrupt: model.safetensors: sha256" in message
    assert f"checkpoint {uri}40 was not stored: checkpoints.store: upload failed (timeout)" in message


def test_notices_never_carry_a_secret_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-secret-0d9e8f")
    report = reporter(tmp_path)
    report_checkpoint_events(report)(Event("invalid", "s3://b/k", 1, "signed with canary-secret-0d9e8f"))
    assert "canary-secret-0d9e8f" not in (tmp_path / "progress.json").read_text()


# --- GPU series ---------------------------------------------------------------------------------------


def gpu_samples(metrics: TrainerMetrics) -> list[str]:
    text = metrics.exposition().decode()
    return [line for line in text.splitlines() if line.startswith("finetune_gpu_")]


def test_no_gpu_series_without_cuda(metrics: TrainerMetrics, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    metrics.set_gpu_usage()
    assert gpu_samples(metrics) == [], "a CPU run must not show GPUs at 0 bytes and 0 %"


class FakeCuda:
    """Two devices; utilization as NVML reports it, or the error torch raises without pynvml."""

    def __init__(self, utilization: int | None) -> None:
        self._utilization = utilization
        self.utilization_calls = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 1_000 * (i + 1))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 4_000 * (i + 1))
        monkeypatch.setattr(torch.cuda, "utilization", self.utilization)

    def utilization(self, device: int) -> int:
        self.utilization_calls += 1
        if self._utilization is None:
            raise ModuleNotFoundError("No module named 'pynvml'")
        return self._utilization


def test_gpu_memory_and_utilization_per_device(
    metrics: TrainerMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeCuda(utilization=37).install(monkeypatch)
    metrics.set_gpu_usage()
    value = metrics.registry.get_sample_value
    for device, scale in (("0", 1), ("1", 2)):
        labels = {"namespace": "team-a", "job": "bot", "device": device}
        assert value("finetune_gpu_memory_allocated_bytes", labels) == 1_000 * scale
        assert value("finetune_gpu_memory_reserved_bytes", labels) == 4_000 * scale
        assert value("finetune_gpu_utilization_ratio", labels) == pytest.approx(0.37)


def test_gpu_utilization_is_skipped_without_nvml(
    metrics: TrainerMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    cuda = FakeCuda(utilization=None)
    cuda.install(monkeypatch)
    metrics.set_gpu_usage()
    metrics.set_gpu_usage()
    samples = gpu_samples(metrics)
    assert not [s for s in samples if s.startswith("finetune_gpu_utilization_ratio")]
    assert len([s for s in samples if s.startswith("finetune_gpu_memory_reserved_bytes")]) == 2
    assert cuda.utilization_calls == 1, "a missing NVML is not retried at every log step"


# --- checkpoint series from the sink's events -------------------------------------------------------


def test_checkpoint_events_set_the_checkpoint_series(tmp_path: Path, metrics: TrainerMetrics) -> None:
    handle = report_checkpoint_events(reporter(tmp_path), metrics)
    uri = "s3://ckpt/jobs/ns/bot/uid/checkpoints/step-"
    labels = {"namespace": "team-a", "job": "bot"}
    value = metrics.registry.get_sample_value
    assert value("finetune_checkpoint_uploaded_bytes_total", labels) == 0, "at 0 before the first upload"

    before = time.time()
    handle(Event("committed", uri + "20", 20, upload_seconds=2.5, upload_bytes=3_000))
    handle(Event("verified", uri + "20", 20))
    handle(Event("committed", uri + "40", 40, upload_seconds=0.7, upload_bytes=1_000))
    handle(Event("invalid", uri + "40", 40, "restored model differs"))
    after = time.time()

    assert value("finetune_checkpoint_last_committed_step", labels) == 40
    assert value("finetune_checkpoint_last_verified_step", labels) == 20, "step 40 failed verification"
    for name in ("committed", "verified"):
        stamp = value(f"finetune_checkpoint_last_{name}_timestamp_seconds", labels)
        assert stamp is not None and before <= stamp <= after
    assert value("finetune_checkpoint_uploaded_bytes_total", labels) == 4_000
    assert value("finetune_checkpoint_upload_duration_seconds_count", labels) == 2
    assert value("finetune_checkpoint_upload_duration_seconds_sum", labels) == pytest.approx(3.2)
    assert value("finetune_checkpoint_upload_duration_seconds_bucket", {**labels, "le": "1.0"}) == 1

    handle(
        Event(
            "committed", "s3://ckpt/jobs/ns/bot/uid/checkpoints/final", 40, upload_seconds=1, upload_bytes=1
        )
    )
    handle(Event("verified", "s3://ckpt/jobs/ns/bot/uid/checkpoints/final", None))
    assert value("finetune_checkpoint_last_verified_step", labels) == 40, (
        "the final artifact has the last step"
    )


# --- the last scrape after a run ---------------------------------------------------------------------


@pytest.fixture
def sigterm_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """SIGTERM handling and the recorded request as they were before the test."""
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(termination, "_requested", False)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture
def served(metrics: TrainerMetrics) -> Iterator[int]:
    port = free_port()
    server = metrics.serve(port, env={"POD_IP": "127.0.0.1"})
    yield port
    server.shutdown()
    server.server_close()


def scrapes_during(port: int, seconds: float) -> list[float]:
    """Scrape every 0.1 s in the background; the times (since the start) that answered."""
    answered: list[float] = []
    start = time.monotonic()

    def loop() -> None:
        while (elapsed := time.monotonic() - start) < seconds:
            try:
                if "finetune_step" in scrape("127.0.0.1", port):
                    answered.append(elapsed)
            except OSError:
                pass
            time.sleep(0.1)

    threading.Thread(target=loop, daemon=True).start()
    return answered


def test_linger_keeps_metrics_up_after_the_run(
    metrics: TrainerMetrics, served: int, sigterm_restored: None
) -> None:
    answered = scrapes_during(served, 5)
    start = time.monotonic()
    metrics.linger(1.5)
    assert 1.5 <= time.monotonic() - start < 3
    assert answered and max(answered) > 1.0, "a scrape late in the linger got the final values"


def test_no_linger_after_sigterm(metrics: TrainerMetrics, served: int, sigterm_restored: None) -> None:
    termination.catch_sigterm()
    os.kill(os.getpid(), signal.SIGTERM)  # preempted: the grace period is for the checkpoint
    start = time.monotonic()
    metrics.linger(30)
    assert time.monotonic() - start < 1


def test_sigterm_during_the_linger_ends_it(
    metrics: TrainerMetrics, served: int, sigterm_restored: None
) -> None:
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    start = time.monotonic()
    metrics.linger(30)
    assert 0.5 <= time.monotonic() - start < 3


def test_no_linger_without_a_metrics_server(metrics: TrainerMetrics, sigterm_restored: None) -> None:
    start = time.monotonic()
    metrics.linger(30)
    assert time.monotonic() - start < 1
