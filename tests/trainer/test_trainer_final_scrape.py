"""`python -m finetune_trainer` keeps /metrics up one scrape interval after the run, so Prometheus
collects the last values, and exits at once (with the run's exit code) on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.request
from pathlib import Path

from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.testing.cli import Running, base_config, start_trainer
from finetune_trainer.testing.tiny import synthetic_dataset, write_jsonl

LINGERING = r"serving the final metrics for"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refused_run(tiny_model: Path, tmp_path: Path, linger_s: float) -> tuple[Running, int]:
    """A run that ends quickly: its data file holds no examples (exit 3)."""
    data = write_jsonl(synthetic_dataset(20, seed=0), tmp_path / "train.jsonl")
    data.write_text("")
    port = free_port()
    config = base_config(
        tiny_model, data, tmp_path / "out", "lora", metricsPort=port, metricsLingerSeconds=linger_s
    )
    return start_trainer(config, tmp_path / "run", env={"POD_IP": "127.0.0.1"}), port


def phase(out: Path) -> str:
    report = out / "progress.json"
    return str(json.loads(report.read_text())["phase"]) if report.is_file() else ""


def test_a_finished_run_still_answers_scrapes(tiny_model: Path, tmp_path: Path) -> None:
    run, port = refused_run(tiny_model, tmp_path, linger_s=3)
    run.wait_for(LINGERING)
    lingering = time.monotonic()
    assert phase(run.out) == "Failed", "the status says how the run ended before the linger"

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert "finetune_trainer_runtime_info{" in response.read().decode()
    assert run.process.poll() is None

    result = run.finish(timeout=60)
    assert result.code == ExitCode.DATA_REFUSED, result.log[-2000:]
    assert time.monotonic() - lingering >= 2.5


def test_sigterm_ends_the_linger_with_the_run_s_exit_code(tiny_model: Path, tmp_path: Path) -> None:
    run, _port = refused_run(tiny_model, tmp_path, linger_s=120)
    run.wait_for(LINGERING)
    run.process.send_signal(signal.SIGTERM)  # the pod is deleted while it waits for the scrape
    signalled = time.monotonic()
    result = run.finish(timeout=30)
    assert result.code == ExitCode.DATA_REFUSED, "a deleted pod still reports why the run ended"
    assert time.monotonic() - signalled < 5
