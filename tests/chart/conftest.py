"""Fixtures that run the built helm binary against the chart; shared by the chart tests.

pytest imports test modules with importlib, so shared functions are handed out as fixtures."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster.tools import MissingToolError, tool

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
KUBE_VERSION = "1.35.0"
MONITORING_API = "monitoring.coreos.com/v1"
PROFILE_FILES: dict[str, list[Path]] = {
    "default": [],
    "onprem": [CHART / "examples" / "values-onprem.yaml"],
    "cloud": [CHART / "examples" / "values-cloud.yaml"],
}

Manifest = dict[str, Any]
HelmRun = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def helm() -> HelmRun:
    """Runs helm with the given arguments; skips when the tools are not built."""
    try:
        binary = tool("helm")
    except MissingToolError as exc:
        pytest.skip(str(exc))

    def _run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)

    return _run


@pytest.fixture(scope="session")
def template_args() -> Callable[..., list[str]]:
    """`helm template` arguments for a profile, extra values files and --set items."""

    def _args(
        profile: str = "default",
        values: Sequence[Path] = (),
        sets: Sequence[str] = (),
        monitoring: bool = True,
        command: str = "template",
    ) -> list[str]:
        args = [command, "ft", str(CHART), "--namespace", "finetune-system"]
        if command == "template":
            args += ["--kube-version", KUBE_VERSION]
            if monitoring:
                args += ["--api-versions", MONITORING_API]
        for path in [*PROFILE_FILES[profile], *values]:
            args += ["--values", str(path)]
        for item in sets:
            args += ["--set", item]
        return args

    return _args


@pytest.fixture(scope="session")
def render(helm: HelmRun, template_args: Callable[..., list[str]]) -> Callable[..., list[Manifest]]:
    """The chart's rendered objects for a profile (see template_args), failing with helm's message."""

    def _render(*args: Any, **kwargs: Any) -> list[Manifest]:
        result = helm(*template_args(*args, **kwargs))
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return _render
