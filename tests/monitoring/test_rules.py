"""The alerts (charts/finetune-operator/files/alerts.yaml): valid, unit-tested, documented."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster.tools import MissingToolError, tool

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "charts" / "finetune-operator" / "files" / "alerts.yaml"
RULE_TESTS = sorted((Path(__file__).parent / "rules").glob("*_test.yaml"))
RUNBOOKS = REPO / "docs" / "runbooks.md"
METRIC = re.compile(r"\b(finetune_[a-z0-9_]+)\b")


@pytest.fixture(scope="module")
def promtool() -> Path:
    try:
        return tool("promtool")
    except MissingToolError as exc:
        pytest.skip(str(exc))


def alerts() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promtool_check_rules(promtool: Path) -> None:
    result = subprocess.run([str(promtool), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests(promtool: Path) -> None:
    result = subprocess.run(
        [str(promtool), "test", "rules", *map(str, RULE_TESTS)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a case where it fires, and a case (or a neighbouring series) where it does not."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            series_jobs = {re.search(r'job="([^"]+)"', s["series"]) for s in case["input_series"]}
            jobs = {m.group(1) for m in series_jobs if m}
            handlers = {
                m.group(1)
                for s in case["input_series"]
                if (m := re.search(r'handler="([^"]+)"', s["series"]))
            }
            for check in case["alert_rule_test"]:
                expected = check.get("exp_alerts") or []
                if not expected:
                    quiet.add(check["alertname"])
                    continue
                firing.add(check["alertname"])
                alerted = {a["exp_labels"].get("job") for a in expected} | {
                    a["exp_labels"].get("handler") for a in expected
                }
                if (jobs | handlers) - alerted:
                    quiet.add(check["alertname"])  # a healthy series in the same case stayed quiet
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"


def test_operator_serves_the_documented_metrics(
    operator_metrics_served: set[str], documented_operator_metrics: set[str]
) -> None:
    """The alerts and the dashboard are written against these names."""
    assert operator_metrics_served == documented_operator_metrics


def _anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_alert_is_documented(rule: dict[str, Any], known_metrics: set[str]) -> None:
    annotations = rule["annotations"]
    assert annotations["summary"] and rule["labels"]["severity"] in {"warning", "critical"}
    # Per-job alerts name the job; operator alerts name the operator's namespace.
    assert "{{ $labels.namespace }}" in annotations["description"]
    if "by (namespace, job" in rule["expr"]:
        assert "{{ $labels.job }}" in annotations["description"]
    url = annotations["runbook_url"]
    assert url.startswith("https://github.com/finetune-dev/finetune-operator/blob/main/docs/runbooks.md#")
    headings = {_anchor(h) for h in re.findall(r"^## (.+)$", RUNBOOKS.read_text(), re.MULTILINE)}
    assert url.rsplit("#", 1)[1] in headings, f"docs/runbooks.md has no section for {rule['alert']}"
    unknown = set(METRIC.findall(rule["expr"])) - known_metrics
    assert not unknown, f"{rule['alert']} queries metrics nobody serves: {unknown}"
