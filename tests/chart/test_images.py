"""The Dockerfiles and the pinned dependency sets.

No Docker engine runs here, so the images are not built. Instead:
- a documented lint (the hadolint rules that matter here): base images pinned to a version tag,
  never `latest`; the last USER is a non-zero numeric uid (so the kubelet can verify runAsNonRoot);
  pip never keeps a cache; apt installs no recommends and drops its lists in the same layer;
  no ADD of URLs; exec-form ENTRYPOINT;
- the files each Dockerfile copies are enough to build the project's wheel;
- the pins satisfy pyproject.toml, and (slow, needs PyPI) pip resolves the trainer's pinned set.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
OPERATOR_DOCKERFILE = REPO / "operator" / "Dockerfile"
TRAINER_DOCKERFILE = REPO / "trainer_image" / "Dockerfile"
CONSTRAINTS = REPO / "hack" / "constraints"
TRAINER_PINNED = ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def lint(text: str) -> list[str]:
    """Problems in a Dockerfile, each naming the instruction and the fix."""
    problems: list[str] = []
    steps = instructions(text)
    stages = set()
    for word, args in steps:
        if word == "FROM":
            parts = args.split()
            image = parts[0]
            if len(parts) >= 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
            if image in stages:
                continue
            tag = image.split("@")[0].rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
            if not tag or tag == "latest" or not re.search(r"\d", tag):
                problems.append(f"FROM {image}: pin a version tag (not latest, not untagged)")
        if word == "ADD" and re.search(r"https?://", args):
            problems.append(f"ADD {args}: download in a RUN with a checksum instead")
        if word == "RUN":
            for command in re.split(r"&&|;|\|\|", args):
                tokens = command.split()
                if "pip" in tokens[:3] and "install" in tokens and "--no-cache-dir" not in tokens:
                    problems.append(f"RUN {command.strip()}: add --no-cache-dir")
                if "apt-get" in tokens and "install" in tokens and "--no-install-recommends" not in tokens:
                    problems.append(f"RUN {command.strip()}: add --no-install-recommends")
            if "apt-get install" in args and "rm -rf /var/lib/apt/lists" not in args:
                problems.append("RUN apt-get install: remove /var/lib/apt/lists in the same RUN")
            if re.search(r"\bsudo\b", args):
                problems.append("RUN sudo: not needed, and keeps a setuid binary in the image")
    users = [args for word, args in steps if word == "USER"]
    if not users:
        problems.append("no USER: the image would run as root")
    else:
        uid = users[-1].split(":")[0]
        if not uid.isdigit() or int(uid) == 0:
            problems.append(f"USER {users[-1]}: use a non-zero numeric uid so runAsNonRoot can be verified")
    entrypoints = [args for word, args in steps if word == "ENTRYPOINT"]
    if not entrypoints or not entrypoints[-1].startswith("["):
        problems.append('ENTRYPOINT: use the exec form ["python", "-m", ...] so signals reach Python')
    return problems


@pytest.mark.parametrize("dockerfile", [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE], ids=["operator", "trainer"])
def test_dockerfile_lint(dockerfile: Path) -> None:
    assert lint(dockerfile.read_text()) == []


@pytest.mark.parametrize(
    ("snippet", "problem"),
    [
        ('FROM python:latest\nUSER 1000\nENTRYPOINT ["python"]', "pin a version tag"),
        ('FROM python\nUSER 1000\nENTRYPOINT ["python"]', "pin a version tag"),
        ('FROM python:3.11.14-slim\nENTRYPOINT ["python"]', "no USER"),
        ('FROM python:3.11.14-slim\nUSER root\nENTRYPOINT ["python"]', "non-zero numeric uid"),
        ('FROM python:3.11.14-slim\nUSER 0\nENTRYPOINT ["python"]', "non-zero numeric uid"),
        (
            'FROM python:3.11.14-slim\nRUN pip install torch\nUSER 1000\nENTRYPOINT ["python"]',
            "--no-cache-dir",
        ),
        (
            'FROM ubuntu:24.04\nRUN apt-get update && apt-get install -y vim\nUSER 1\nENTRYPOINT ["x"]',
            "--no-install-recommends",
        ),
        ("FROM python:3.11.14-slim\nUSER 1000\nENTRYPOINT python -m app", "exec form"),
    ],
)
def test_dockerfile_lint_catches(snippet: str, problem: str) -> None:
    assert any(problem in p for p in lint(snippet)), lint(snippet)


def test_operator_image_has_no_torch() -> None:
    text = OPERATOR_DOCKERFILE.read_text()
    assert "[trainer]" not in text and "optional-dependencies" not in text
    pins = (CONSTRAINTS / "operator.txt").read_text()
    assert not re.search(r"^(torch|transformers|deepspeed)==", pins, re.MULTILINE)
    assert 'ENTRYPOINT ["python", "-m", "finetune_operator"]' in text


def test_trainer_image_entrypoint_and_order() -> None:
    text = TRAINER_DOCKERFILE.read_text()
    # tini as PID 1 forwards SIGTERM to the trainer and reaps orphans.
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m", "finetune_trainer"]' in text
    assert any(word == "RUN" and " tini" in args for word, args in instructions(text))
    base = next(args for word, args in instructions(text) if word == "FROM")
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    # DeepSpeed's build imports torch: torch must be installed first, deepspeed without isolation.
    runs = [args for word, args in instructions(text) if word == "RUN" and "pip install" in args]
    torch_step = next(i for i, r in enumerate(runs) if r.rstrip().endswith(" torch"))
    deepspeed_step = next(i for i, r in enumerate(runs) if "deepspeed" in r)
    assert torch_step < deepspeed_step and "--no-build-isolation" in runs[deepspeed_step]


def copied_sources(dockerfile: Path) -> list[str]:
    sources = []
    for word, args in instructions(dockerfile.read_text()):
        if word == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
    return sources


@pytest.mark.parametrize("dockerfile", [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE], ids=["operator", "trainer"])
def test_copied_files_build_the_project(dockerfile: Path, tmp_path: Path) -> None:
    """A user's `docker build` from the repository root has what `pip install .` needs."""
    context = tmp_path / "context"
    for source in copied_sources(dockerfile):
        path = REPO / source
        assert path.exists(), f"{dockerfile.relative_to(REPO)} copies {source}, which does not exist"
        target = context / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, target)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "w"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    names = zipfile.ZipFile(next((tmp_path / "w").glob("*.whl"))).namelist()
    assert "finetune_operator/api.py" in names and "finetune_trainer/config.py" in names


def pins(name: str) -> dict[str, str]:
    found = {}
    for line in (CONSTRAINTS / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!]+)", line.strip())
            assert match, f"{name}: {line!r} is not an exact pin (name==version)"
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def project_requirements(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
    return [Requirement(r) for r in names]


@pytest.mark.parametrize(("constraints", "extra"), [("operator.txt", None), ("trainer.txt", "trainer")])
def test_pins_satisfy_pyproject(constraints: str, extra: str | None) -> None:
    pinned = pins(constraints)
    for requirement in project_requirements(extra):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{constraints} does not pin {requirement.name}"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{constraints} pins {name}=={pinned[name]}, outside pyproject's {requirement}"
        )
    if extra == "trainer":
        assert set(TRAINER_PINNED) <= pinned.keys()


@pytest.mark.slow
def test_trainer_constraints_resolve(tmp_path: Path) -> None:
    """pip resolves the trainer's pinned set (what the image installs) without conflicts."""
    requirements = [str(r) for r in project_requirements("trainer")] + ["deepspeed"]
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "-c",
            str(CONSTRAINTS / "trainer.txt"),
            *requirements,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    resolved = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    pinned = pins("trainer.txt")
    unpinned = sorted(set(resolved) - set(pinned))
    assert not unpinned, f"resolved but not pinned in trainer.txt: {unpinned}"
    for name in TRAINER_PINNED:
        assert resolved[name] == pinned[name]
