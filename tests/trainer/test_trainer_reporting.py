"""The metrics server's address and the progress report's checkpoint fields and notices."""

from __future__ import annotations

import json
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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
