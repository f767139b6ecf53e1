"""kube-score, a third-party check of Kubernetes objects, on what a cluster admin reviews: the
trainer Job (and its Service and NetworkPolicy) the operator renders, and the chart. Each finding
is fixed or listed with its reason in hack/kube-score.yaml."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import api, builders, policy
from finetune_operator.settings import OperatorSettings
from localcluster.tools import MissingToolError, tool

REPO = Path(__file__).resolve().parents[2]
CONFIG = yaml.safe_load((REPO / "hack" / "kube-score.yaml").read_text())
BASE: dict[str, Any] = {
    "goal": {"task": "answer support tickets", "metrics": ["exact_match"]},
    "model": {"source": "hf://Qwen/Qwen2.5-7B", "parameters": "7B"},
    "dataset": {"source": "s3://data/tickets.jsonl", "format": "alpaca", "expectedExamples": 20000},
    "checkpoints": {"store": {"bucket": "ckpt", "credentialsSecret": "s3-creds"}},
    "env": [{"name": "SUPABASE_SERVICE_ROLE_KEY", "secretKeyRef": {"name": "persistence", "key": "key"}}],
}
Manifest = dict[str, Any]
# A single-GPU LoRA job, and a two-node, eight-GPU ZeRO job (with its Service).
SPECS = {
    "lora-1x1": {},
    "full-2x8": {"method": {"type": "full"}, "resources": {"nodes": 2, "gpusPerNode": 8}},
}


@pytest.fixture(scope="module")
def kube_score() -> Path:
    try:
        return tool("kube-score")
    except MissingToolError as exc:
        pytest.skip(str(exc))


def arguments(target: str, leave_out: str = "") -> list[str]:
    args = [
        e["flag"] for e in CONFIG["flags"] if e.get("applies_to", target) == target and e["flag"] != leave_out
    ]
    for entry in CONFIG["ignored_tests"]:
        if entry.get("applies_to", target) == target and entry["id"] != leave_out:
            args += ["--ignore-test", entry["id"]]
    return args


def score(
    binary: Path, objects: list[Manifest], args: list[str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    return subprocess.run(
        [str(binary), "score", "--output-format", "ci", *args, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def trainer_objects(name: str) -> list[Manifest]:
    spec = api.parse_spec({**BASE, **SPECS[name]})
    settings = OperatorSettings(gpu_memory_gib=80)
    decision = policy.resolve_method(spec, settings)
    job = builders.JobRef(name=name, namespace="team-a", uid="3f1c-uid")
    return builders.build_children(job, spec, decision, settings, is_cloud=True)


def findings(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(("[CRITICAL]", "[WARNING]"))]


@pytest.mark.parametrize("name", list(SPECS))
def test_the_rendered_trainer_job_passes(kube_score: Path, tmp_path: Path, name: str) -> None:
    result = score(kube_score, trainer_objects(name), arguments("trainer"), tmp_path)
    assert result.returncode == 0 and not findings(result), result.stdout


def test_the_chart_passes(kube_score: Path, render: Callable[..., list[Manifest]], tmp_path: Path) -> None:
    for profile in ("default", "cloud"):
        result = score(kube_score, render(profile), arguments("chart"), tmp_path)
        assert result.returncode == 0 and not findings(result), (profile, result.stdout)


@pytest.mark.parametrize(
    ("target", "entry"),
    [
        (e.get("applies_to", t), e.get("flag") or e["id"])
        for e in CONFIG["flags"] + CONFIG["ignored_tests"]
        for t in ("trainer", "chart")
        if e.get("applies_to", t) == t
    ],
)
def test_every_accepted_finding_is_still_there(
    kube_score: Path, render: Callable[..., list[Manifest]], tmp_path: Path, target: str, entry: str
) -> None:
    """An entry that no longer matches a finding goes: the list stays what remains to fix."""
    objects = trainer_objects("full-2x8") if target == "trainer" else render("default")
    result = score(kube_score, objects, arguments(target, leave_out=entry), tmp_path)
    assert findings(result), (
        f"{entry} ({target}) is listed in hack/kube-score.yaml but kube-score finds nothing"
    )
