"""Checkpoint upload: the trainer's background upload (hard-linked staging, sha256 manifest, files
then MANIFEST.json) against a plain boto3 `upload_file` of the same files to the same server, in the
same run. Starts its own versitygw (from `hack/build-tools.sh --print-bin-dir`).

    python benchmarks/checkpoint_upload.py [--mib 256] [--files 4]
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe

from finetune_trainer.checkpoints import CheckpointStore, S3Sink
from finetune_trainer.config import TrainerConfig

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


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


@contextmanager
def s3_server(root: Path) -> Iterator[str]:
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
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("versitygw did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def checkpoint(folder: Path, mib: int, files: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(files):
        with (folder / f"model-{i:05d}.safetensors").open("wb") as out:
            for _ in range(mib // files):
                out.write(os.urandom(MiB))
    (folder / "trainer_state.json").write_text('{"global_step": 1, "log_history": []}')
    return folder


def config(endpoint: str, bucket: str, out: Path) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": {"namespace": "bench", "name": "upload", "uid": "uid-1"},
            "model": {"source": "unused"},
            "dataset": {"source": "unused.jsonl"},
            "method": {"type": "full"},
            "checkpoints": {
                "store": {"endpoint": endpoint, "region": "us-east-1", "bucket": bucket, "pathStyle": True},
                "verifyRestore": False,
            },
            "outputDir": str(out),
        }
    )


def plain_upload(client: Any, bucket: str, folder: Path) -> float:
    start = time.perf_counter()
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), bucket, f"plain/{path.name}")
    return time.perf_counter() - start


def sink_upload(cfg: TrainerConfig, folder: Path, step: int) -> float:
    sink = S3Sink(CheckpointStore(cfg.checkpoints.store, cfg.job), cfg)
    start = time.perf_counter()
    sink.save(folder, step, {})  # returns at once: the upload runs in the background...
    sink.close()  # ...and this waits until the manifest is committed
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=256, help="checkpoint size")
    parser.add_argument("--files", type=int, default=4, help="weight files it is split into")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are compared")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp, s3_server(Path(tmp)) as endpoint:
        root = Path(tmp)
        cfg = config(endpoint, "bench", root / "out")
        store = CheckpointStore(cfg.checkpoints.store, cfg.job)
        store.objects.client.create_bucket(Bucket="bench")
        folder = checkpoint(root / "out" / "checkpoint-1", args.mib, args.files)
        plains, sinks = [], []
        for step in range(1, args.repeat + 1):  # interleaved, so a warming server favours neither
            plains.append(plain_upload(store.objects.client, "bench", folder))
            sinks.append(sink_upload(cfg, folder, step))
        plain, ours = statistics.median(plains), statistics.median(sinks)
    print(describe())
    print(
        f"size={args.mib} MiB in {args.files} files, median of {args.repeat}: "
        f"plain upload_file {plain:.2f} s, checkpoint upload {ours:.2f} s"
    )
    print(f"ratio={ours / plain:.2f} (background checkpoint upload with manifest vs plain boto3 upload_file)")


if __name__ == "__main__":
    main()
