"""Known metric names: the operator's (the documented contract) and the trainer's (read from
trainer_image/finetune_trainer/reporting.py), handed out as fixtures."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REPORTING = REPO / "trainer_image" / "finetune_trainer" / "reporting.py"
OPERATOR_METRICS_MODULE = REPO / "operator" / "finetune_operator" / "metrics.py"

# What the operator serves on /metrics (operator/finetune_operator/metrics.py implements these).
OPERATOR_METRICS = {
    "finetune_operator_reconciles_total",
    "finetune_operator_reconcile_errors_total",
    "finetune_operator_reconcile_duration_seconds_bucket",
    "finetune_operator_reconcile_duration_seconds_sum",
    "finetune_operator_reconcile_duration_seconds_count",
    "finetune_jobs",
    "finetune_job_restarts_total",
    "finetune_job_time_to_first_step_seconds",
    "finetune_checkpoint_age_seconds",
    "finetune_checkpoint_last_verified_step",
    "finetune_job_phase",
    "finetune_operator_watch_staleness_seconds",
    "finetune_operator_sync_errors_total",
    "finetune_operator_leader",
}

# Series names a prometheus_client metric type exposes, by constructor.
_SUFFIXES = {
    "Gauge": ("",),
    "Counter": ("_total",),
    "Info": ("_info",),
    "Histogram": ("_bucket", "_sum", "_count"),
    "Summary": ("_sum", "_count"),
    "Enum": ("",),
}


def metric_names(module: Path) -> set[str]:
    """Series names of every prometheus_client metric constructed in a module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SUFFIXES:
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                # prometheus_client adds _total to counters whether or not the name has it.
                base = first.value.removesuffix("_total") if node.func.id == "Counter" else first.value
                names |= {base + suffix for suffix in _SUFFIXES[node.func.id]}
    return names


@pytest.fixture(scope="session")
def operator_metrics_served() -> set[str]:
    if not OPERATOR_METRICS_MODULE.exists():
        pytest.skip(f"{OPERATOR_METRICS_MODULE.relative_to(REPO)} does not exist yet")
    return metric_names(OPERATOR_METRICS_MODULE)


@pytest.fixture(scope="session")
def documented_operator_metrics() -> set[str]:
    return OPERATOR_METRICS


@pytest.fixture(scope="session")
def known_metrics() -> set[str]:
    trainer = metric_names(REPORTING)
    assert trainer, f"no metrics found in {REPORTING}"
    return OPERATOR_METRICS | trainer
