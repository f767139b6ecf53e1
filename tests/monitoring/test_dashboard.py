"""The Grafana dashboard in the chart: generated, well-formed, and querying only real metrics."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "finetune-operator" / "dashboards" / "finetune.json"
GENERATOR = REPO / "hack" / "dashboard.py"
METRIC = re.compile(r"\b(finetune_[a-z0-9_]+)\b")


def load() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def panels(document: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in document["panels"]:
        found += [panel, *panel.get("panels", [])]
    return found


def queries(document: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(document) for t in p.get("targets", [])]


def test_checked_in_json_is_the_generated_one() -> None:
    spec = importlib.util.spec_from_file_location("dashboard_generator", GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), "stale dashboard: run `python hack/dashboard.py`"


def test_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in panels(load())]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)


def test_datasource_is_a_variable() -> None:
    document = load()
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(document):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    for name in ("namespace", "job"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"


def test_no_hard_coded_namespace_or_job() -> None:
    for expr in queries(load()):
        for label in ("namespace", "job"):
            for value in re.findall(rf'\b{label}\s*=~?\s*"([^"]*)"', expr):
                assert value == f"${label}", f"hard-coded {label} in {expr}"


def test_per_job_panels_use_both_variables() -> None:
    document = load()
    job_row = next(i for i, p in enumerate(document["panels"]) if p["type"] == "row" and "$job" in p["title"])
    for panel in document["panels"][job_row + 1 :]:
        for target in panel["targets"]:
            assert 'namespace=~"$namespace"' in target["expr"] and 'job="$job"' in target["expr"], panel[
                "title"
            ]


def test_drill_down_covers_what_users_look_for() -> None:
    titles = " | ".join(p["title"] for p in panels(load())).lower()
    for wanted in (
        "jobs by phase",
        "failed",
        "gpu memory",
        "loss",
        "evaluation",
        "throughput",
        "checkpoint timeline",
        "checkpoint age",
        "predictions",
        "data report",
        "runtime flags",
    ):
        assert wanted in titles, f"no panel about {wanted}"
    assert any('split="baseline"' in q for q in queries(load())), "no baseline line"


def test_queries_use_only_served_metrics(known_metrics: set[str]) -> None:
    used = {name for expr in queries(load()) for name in METRIC.findall(expr)}
    assert used, "no queries found"
    assert used <= known_metrics, f"metrics nobody serves: {sorted(used - known_metrics)}"
