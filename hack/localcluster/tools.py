"""Finding the binaries that hack/build-tools.sh built."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

HACK_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = HACK_DIR.parent
BUILD_SCRIPT = HACK_DIR / "build-tools.sh"
BUILD_COMMAND = "hack/build-tools.sh"

REQUIRED = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "helm",
    "versitygw",
    "prometheus",
    "promtool",
    "tini",
)


class MissingToolError(RuntimeError):
    """A tool is not built; the message says which and how to build it."""


def bin_dir() -> Path:
    """The cache directory for the current pins (FINETUNE_TOOLS_BIN overrides it)."""
    override = os.environ.get("FINETUNE_TOOLS_BIN")
    if override:
        return Path(override)
    out = subprocess.run([str(BUILD_SCRIPT), "--print-bin-dir"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def tool(name: str) -> Path:
    """The path of one built tool, or an error naming the command that builds it."""
    path = bin_dir() / name
    if not path.is_file() or not os.access(path, os.X_OK):
        raise MissingToolError(
            f"{name} is not built (looked for {path}); run `{BUILD_COMMAND}` from {REPO_ROOT} "
            "once (about 15 minutes cold, cached afterwards)"
        )
    return path


def check_all() -> dict[str, Path]:
    """Every required tool, failing with one message that lists all missing ones."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in REQUIRED:
        try:
            found[name] = tool(name)
        except MissingToolError:
            missing.append(name)
    if missing:
        raise MissingToolError(
            f"missing tools: {', '.join(missing)} in {bin_dir()}; run `{BUILD_COMMAND}` from {REPO_ROOT}"
        )
    return found
