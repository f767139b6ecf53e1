"""Monitoring against the local stack's real Prometheus: a tiny fine-tune is scraped from the operator
and its trainer pod; every dashboard query (variables substituted as Grafana does) returns data for
it; the alert rules load and evaluate; the runtime info metric tells the truth; no secret gets in."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
import yaml
from kubernetes import client

from localcluster import ClusterInfo
from localcluster.testing import wait_for
from localcluster.tools import REPO_ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

JOB = "monitored"
DASHBOARD = REPO_ROOT / "charts" / "finetune-operator" / "dashboards" / "finetune.json"
ALERTS = REPO_ROOT / "charts" / "finetune-operator" / "files" / "alerts.yaml"
RENDERER = REPO_ROOT / "hack" / "render_panel.py"
TERMINAL = ("Succeeded", "Failed")


def without_gpu() -> bool:
    import torch  # the trainer's own check: on a machine with CUDA these panels must have data

    return not torch.cuda.is_available()


# Panels that cannot show data in this run, and why. Every title must exist in the dashboard.
NO_DATA_WITHOUT_GPU = {
    "GPU memory in use": "trainer pods run on CPU here: no GPU memory is allocated or reported",
    "GPU memory by job": "trainer pods run on CPU here: no GPU memory is allocated or reported",
    "GPU memory": "trainer pods run on CPU here: no GPU memory is allocated or reported",
    "GPU utilization": "trainer pods run on CPU here: there is no GPU to report on",
}


class Prometheus:
    """The HTTP API, failing the test on any error or warning Prometheus reports."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: Any) -> Any:
        response = requests.get(f"{self.url}{path}", params=params, timeout=30)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        assert not body.get("warnings"), f"{path} {params}: {body['warnings']}"
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr} | ({"time": at} if at else {})
        result: list[dict[str, Any]] = self.get("/api/v1/query", **params)["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query_range", query=expr, start=start, end=end, step=step)
        result: list[dict[str, Any]] = data["result"]
        return result

    def reload(self) -> None:
        response = requests.post(f"{self.url}/-/reload", timeout=30)
        assert response.status_code == 200, f"Prometheus refused the reload: {response.text}"


@contextmanager
def alert_rules_loaded(cluster: ClusterInfo, prometheus: Prometheus) -> Iterator[None]:
    """The chart's alerts in the harness's Prometheus, through its config file and a reload: the
    harness has no rule_files option."""
    config_file = Path(cluster.run_dir) / "prometheus" / "prometheus.yml"
    original = config_file.read_text()
    rules = config_file.with_name("finetune-alerts.yaml")
    shutil.copyfile(ALERTS, rules)
    config = yaml.safe_load(original) | {"rule_files": [str(rules)]}
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        prometheus.reload()
        yield
    finally:
        config_file.write_text(original)
        prometheus.reload()
        rules.unlink()


def alert_names() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"]}


def rule_health(prometheus: Prometheus) -> dict[str, str]:
    """Alert name -> 'ok', or what went wrong in its last evaluation."""
    rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
    return {r["name"]: r["health"] if r["health"] != "err" else f"err: {r['lastError']}" for r in rules}


def scrape_targets(prometheus: Prometheus, namespace: str) -> dict[str, str]:
    """Health of the operator's target and of the trainer pod's, by role ('' when not found)."""
    found = {"operator": "", "trainer": ""}
    for target in prometheus.get("/api/v1/targets", state="active")["activeTargets"]:
        labels = target["labels"]
        health = target["health"] + (f" ({target['lastError']})" if target["lastError"] else "")
        if labels.get("job") == "operator":
            found["operator"] = health
        elif labels.get("job") == "pods" and labels.get("namespace") == namespace:
            found["trainer"] = health
    return found


def scrape_interval_s(prometheus: Prometheus) -> float:
    interval = str(
        yaml.safe_load(prometheus.get("/api/v1/status/config")["yaml"])["global"]["scrape_interval"]
    )
    match = re.fullmatch(r"(\d+)(s|m)", interval)
    assert match, f"unexpected scrape interval {interval}"
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def grafana_variables(expr: str, values: dict[str, str]) -> str:
    """Substitutes $name and ${name} as Grafana would; an unknown variable fails the test."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"no value for ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query of every panel."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t) for p in panels for t in p.get("targets", [])]


def secret_values(core: client.CoreV1Api, namespace: str) -> list[str]:
    values = []
    for name in ("s3-creds", "persistence"):
        data = core.read_namespaced_secret(name, namespace).data or {}
        values += [base64.b64decode(v).decode() for v in data.values()]
    assert len(values) >= 3 and all(len(v) >= 8 for v in values), "canaries too short to mean anything"
    return values


def load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_panel", RENDERER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheus_shows_a_fine_tune_as_the_dashboard_and_alerts_expect(
    launch_tiny: Callable[..., dict[str, Any]],
    job_status: Callable[[str], dict[str, Any]],
    pod_logs: Callable[[], str],
    core: client.CoreV1Api,
    cluster: ClusterInfo,
    operator: Any,
    namespace: str,
    tmp_path: Path,
) -> None:
    prometheus = Prometheus(cluster.prometheus_url)
    scrape_s = scrape_interval_s(prometheus)
    user_id = f"user-{uuid.uuid4().hex[:8]}"
    with alert_rules_loaded(cluster, prometheus):
        start = time.time()
        uid = launch_tiny(JOB, userId=user_id)["metadata"]["uid"]

        # While it trains: both ends scraped, and the rules evaluate on live trainer series.
        def training_and_scraped() -> dict[str, str] | None:
            phase = job_status(JOB).get("phase")
            if phase in TERMINAL:
                return {"ended early": str(phase)}
            targets = scrape_targets(prometheus, namespace)
            step = prometheus.query(f'finetune_step{{namespace="{namespace}", job="{JOB}"}} > 0')
            return targets if step and set(targets.values()) == {"up"} else None

        seen = wait_for(training_and_scraped, 600, "the trainer to train while scraped", 1, pod_logs)
        assert seen == {"operator": "up", "trainer": "up"}, (seen, pod_logs())
        health = wait_for(
            lambda: (h := rule_health(prometheus)) and "unknown" not in h.values() and h,
            60,
            "rules evaluated",
        )
        assert health == dict.fromkeys(alert_names(), "ok"), health

        def finished() -> dict[str, Any] | None:
            status = job_status(JOB)
            return status if status.get("phase") in TERMINAL else None

        status = wait_for(finished, 600, "the job to finish", 2, pod_logs)
        assert status["phase"] == "Succeeded", (status, pod_logs())
        # The operator's last word (phase Succeeded) reaches Prometheus before we look.
        succeeded = f'finetune_job_phase{{namespace="{namespace}", job="{JOB}", phase="Succeeded"}} == 1'
        wait_for(lambda: prometheus.query(succeeded), 60, "Prometheus to see the job Succeeded")
        assert set(rule_health(prometheus).values()) == {"ok"}, rule_health(prometheus)
    end = time.time()

    # Every panel, as a user opening the dashboard now on the run's time range would see it.
    # Grafana's $__interval is the step (at least the data source's scrape interval), and
    # $__rate_interval max($__interval + scrape interval, 4 x scrape interval).
    window = int(end - start) + 1
    variables = {
        "namespace": namespace,
        "job": JOB,
        "datasource": "prometheus",
        "__interval": f"{scrape_s:g}s",
        "__rate_interval": f"{4 * scrape_s:g}s",
        "__range": f"{window}s",
    }
    titles = {title for title, _ in dashboard_targets()}
    assert set(NO_DATA_WITHOUT_GPU) <= titles, "an exception names a panel the dashboard no longer has"
    exempt = NO_DATA_WITHOUT_GPU if without_gpu() else {}
    empty, checked = [], 0
    for title, target in dashboard_targets():
        if title in exempt:
            continue
        expr = grafana_variables(target["expr"], variables)
        if target.get("instant"):
            result = prometheus.query(expr, at=end)
        else:
            result = prometheus.query_range(expr, end - window, end, scrape_s)
        checked += 1
        if not result:
            empty.append(f"{title} [{target['refId']}]: {expr}")
    assert checked and not empty, "panels without data:\n" + "\n".join(empty)

    # The template variables offer this namespace and job.
    offered = prometheus.get("/api/v1/label/namespace/values", **{"match[]": "finetune_job_phase"})
    assert namespace in offered
    offered = prometheus.get(
        "/api/v1/label/job/values", **{"match[]": f'finetune_job_phase{{namespace="{namespace}"}}'}
    )
    assert offered == [JOB]

    # What the panels show agrees with the run: finished, every step done, the data counted.
    def last(expr: str) -> float:
        series = prometheus.query_range(grafana_variables(expr, variables), end - window, end, scrape_s)
        return float(series[0]["values"][-1][1])

    assert last('max(finetune_step{namespace="$namespace", job="$job"})') == status["progress"]["totalSteps"]
    assert last('max(finetune_data_examples{namespace="$namespace", job="$job", count="raw"})') == 1500
    # Set just before the trainer exits: scraped because it keeps /metrics up one more interval.
    this = 'namespace="$namespace", job="$job"'
    final_loss = last(f'max(finetune_eval_metric_value{{{this}, metric="eval_loss", split="final"}})')
    assert final_loss == pytest.approx(status["final"]["eval_loss"], rel=1e-6)
    # The final artifact is the last checkpoint committed and verified, and it was uploaded.
    assert last(f"max(finetune_checkpoint_last_committed_step{{{this}}})") == status["checkpoint"]["step"]
    assert last(f"max(finetune_checkpoint_last_verified_step{{{this}}})") == status["checkpoint"]["step"]
    assert last(f"sum(finetune_checkpoint_uploaded_bytes_total{{{this}}})") > 0
    phase_now = prometheus.query(f'finetune_job_phase{{namespace="{namespace}", job="{JOB}"}} == 1')
    assert [s["metric"]["phase"] for s in phase_now] == ["Succeeded"]

    # The runtime flags the trainer ran with.
    info = prometheus.query(
        f'last_over_time(finetune_trainer_runtime_info{{namespace="{namespace}", job="{JOB}"}}[{window}s])',
        at=end,
    )
    assert len(info) == 1, info
    flags = info[0]["metric"]
    assert flags["is_cloud"] == "false"
    assert flags["user_id"] == user_id
    assert flags["job_id"] == uid
    assert flags["method"] == status["method"]["type"] == "lora"
    assert flags["world_size"] == "1"
    assert re.match(r"\d+\.\d+", flags["torch"]), flags

    # No secret in any metric name, label name or value, or sample, over the whole run.
    surfaces = [json.dumps(prometheus.get("/api/v1/label/__name__/values"))]
    label_names = prometheus.get("/api/v1/labels")
    assert {"namespace", "job", "user_id"} <= set(label_names)
    for name in label_names:
        surfaces.append(json.dumps(prometheus.get(f"/api/v1/label/{name}/values")))
    everything = prometheus.query_range('{__name__=~"finetune_.+"}', end - window, end, scrape_s)
    assert any(s["metric"].get("namespace") == namespace for s in everything), "the scan missed the run"
    surfaces.append(json.dumps(everything))
    text = "\n".join(surfaces)
    assert namespace in text and uid in text
    for value in secret_values(core, namespace):
        assert value not in text, "a secret's value is in Prometheus"

    # The loss panel renders from the same data (hack/render_panel.py, used for the README image).
    renderer = load_renderer()
    series = renderer.fetch(cluster.prometheus_url, namespace, JOB, end - window, end, scrape_s)
    assert set(series) == {"train", "validation", "baseline"}
    output = tmp_path / "loss-panel.png"
    renderer.render(series, f"Loss: {JOB}", output)
    assert output.read_bytes().startswith(b"\x89PNG")
