"""Checkpoint sync: a checkpoint committed and verified the way the trainer does it, against a plain
boto3 `upload_file` + `download_file` of the same bytes to the same server, in the same run.

Committed and verified: the first `S3Sink.save` of a process (staged by hard links, a sha256
manifest, the files, then `MANIFEST.json`), then `CheckpointStore.verify` (every file downloaded
again and its sha256 checked against the manifest, then the VERIFIED marker). The store has no
restore check, so verification stops at the hashes: loading the weights into a model is not a
transfer cost. The checkpoint has the shapes of a full fine-tune's: two safetensors shards, an
optimizer state four times their size, and the small json/pt files transformers writes.
Starts its own versitygw (from `hack/build-tools.sh --print-bin-dir`).

Rounds are interleaved, and the ratio is the median of each round's ratio, so load from other
work that comes and goes hits both sides of a pair. CPU seconds (this process and the S3 server)
are printed too: on a shared machine they move less than wall time.

    python benchmarks/checkpoint_sync.py [--size-mib 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from machine import describe  # type: ignore[import-not-found]

from finetune_trainer.checkpoints import CheckpointStore, S3Sink
from finetune_trainer.checkpoints.manifest import hash_folder
from finetune_trainer.config import TrainerConfig

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
BUCKET = "bench"
# What transformers' Trainer writes next to the weights, with sizes typical of a small model.
SMALL_FILES = {
    "config.json": 700,
    "generation_config.json": 150,
    "model.safetensors.index.json": 25_000,
    "scheduler.pt": 1_064,
    "rng_state.pth": 14_244,
    "training_args.bin": 5_304,
}


@dataclass(frozen=True)
class Cost:
    wall: float
    cpu: float  # user + system seconds of this process and the S3 server


def versitygw() -> Path:
    out = subprocess.run(
        [str(REPO / "hack" / "build-tools.sh"), "--print-bin-dir"], capture_output=True, text=True, check=True
    )
    binary = Path(out.stdout.strip()) / "versitygw"
    if not binary.is_file():
        sys.exit(f"{binary} is missing: run hack/build-tools.sh first")
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("versitygw did not start") from None
            time.sleep(0.1)


@contextmanager
def s3_server(root: Path) -> Iterator[tuple[str, int]]:
    """versitygw on a free port; credentials go to this process's environment, never argv."""
    port = free_port()
    os.environ["AWS_ACCESS_KEY_ID"] = "bench" + secrets.token_hex(4)
    os.environ["AWS_SECRET_ACCESS_KEY"] = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "ROOT_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "ROOT_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
    }
    (root / "data").mkdir()
    argv = [str(versitygw()), "--port", f"127.0.0.1:{port}", "posix", str(root / "data")]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


def write_random(path: Path, size: int) -> None:
    with path.open("wb") as out:
        for start in range(0, size, 16 * MiB):
            out.write(os.urandom(min(16 * MiB, size - start)))


def checkpoint(folder: Path, size: int) -> Path:
    """A checkpoint-N folder of `size` bytes: Adam's two fp32 moments are 4x bf16 weights."""
    folder.mkdir(parents=True)
    small = sum(SMALL_FILES.values())
    shard = (size - small) // 10
    write_random(folder / "model-00001-of-00002.safetensors", shard)
    write_random(folder / "model-00002-of-00002.safetensors", shard)
    write_random(folder / "optimizer.pt", size - small - 2 * shard)
    for name, length in SMALL_FILES.items():
        write_random(folder / name, length)
    state = {"global_step": 1, "epoch": 0.1, "log_history": [{"step": 1, "loss": 2.5}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def config(endpoint: str, out: Path, keep: int) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": {"namespace": "bench", "name": "sync", "uid": "uid-1"},
            "model": {"source": "unused"},
            "dataset": {"source": "unused.jsonl"},
            "method": {"type": "full"},
            "checkpoints": {
                "store": {"endpoint": endpoint, "region": "us-east-1", "bucket": BUCKET, "pathStyle": True},
                "verifyRestore": True,
                "keep": keep,
            },
            "outputDir": str(out),
        }
    )


def measure(processes: list[psutil.Process], run: Callable[[], None]) -> Cost:
    def cpu() -> float:
        return float(sum(t.user + t.system for t in (p.cpu_times() for p in processes)))

    cpu_start, start = cpu(), time.perf_counter()
    run()
    return Cost(time.perf_counter() - start, cpu() - cpu_start)


def plain_sync(processes: list[psutil.Process], client: Any, folder: Path, target: Path) -> Cost:
    """upload_file then download_file of every file, with boto3's default transfer settings."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    target.mkdir()

    def run() -> None:
        for path in paths:
            client.upload_file(str(path), BUCKET, f"{target.name}/{path.name}")
        for path in paths:
            client.download_file(BUCKET, f"{target.name}/{path.name}", str(target / path.name))

    cost = measure(processes, run)
    shutil.rmtree(target)
    return cost


def checkpoint_sync(
    processes: list[psutil.Process], cfg: TrainerConfig, folder: Path, scratch: Path, step: int
) -> Cost:
    """A new sink per round: a process's first save is committed and verified before it returns."""
    store = CheckpointStore(cfg.checkpoints.store, cfg.job, scratch_dir=scratch / ".verify")
    sink = S3Sink(store, cfg)

    def run() -> None:
        info = sink.save(folder, step, {})
        sink.close()
        if info is None or not info.verified:
            raise RuntimeError(f"step {step} was not verified")

    return measure(processes, run)


def sha256_pass(folder: Path) -> float:
    start = time.perf_counter()
    hash_folder(folder)
    return time.perf_counter() - start


def rounds(size_mib: int, repeat: int) -> tuple[list[Cost], list[Cost], float]:
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp, s3_server(Path(tmp)) as (endpoint, pid):
        root = Path(tmp)
        processes = [psutil.Process(), psutil.Process(pid)]
        cfg = config(endpoint, root / "out", keep=repeat)
        client = CheckpointStore(cfg.checkpoints.store, cfg.job).objects.client
        client.create_bucket(Bucket=BUCKET)
        folder = checkpoint(root / "out" / "checkpoint-1", size_mib * MiB)
        plains, ours = [], []
        for round_ in range(1, repeat + 1):  # interleaved, so a warming server favours neither
            plains.append(plain_sync(processes, client, folder, root / f"plain-{round_}"))
            ours.append(checkpoint_sync(processes, cfg, folder, root, round_))
        return plains, ours, sha256_pass(folder)


def median_ratio(ours: list[Cost], plains: list[Cost], of: Callable[[Cost], float]) -> float:
    return statistics.median(of(o) / of(p) for o, p in zip(ours, plains, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="checkpoint size")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    plains, ours, hashing = rounds(args.size_mib, args.repeat)
    print(describe())
    for name, costs in (("plain upload_file+download_file", plains), ("checkpoint commit+verify", ours)):
        walls = ", ".join(f"{c.wall:.2f}" for c in costs)
        print(f"{name}: wall s per round {walls}; median CPU {statistics.median(c.cpu for c in costs):.2f} s")
    print(
        f"size={args.size_mib} MiB in {len(SMALL_FILES) + 4} files; one sha256 pass over them takes "
        f"{hashing:.2f} s (the protocol makes two); verification checked sha256s only, no model was loaded"
    )
    cpu, wall = median_ratio(ours, plains, lambda c: c.cpu), median_ratio(ours, plains, lambda c: c.wall)
    print(f"cpu_ratio={cpu:.2f} (CPU seconds of this process and the S3 server)")
    print(
        f"ratio={wall:.2f} (median over rounds of checkpoint commit with manifest + sha256 verification "
        "vs plain boto3 upload_file + download_file, wall time; target 1.3)"
    )


if __name__ == "__main__":
    main()
