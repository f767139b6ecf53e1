"""A standalone S3 server (versitygw from hack/build-tools.sh) for tests and benchmarks that need
real S3 but no cluster."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from localcluster.processes import free_port, port_open, start, terminate_group, wait_until
from localcluster.tools import tool


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    log: Path


@contextmanager
def running_s3(root: Path, key_prefix: str = "s3") -> Iterator[S3Server]:
    """versitygw serving `root`/data on a free loopback port with fresh root credentials."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    port = free_port()
    access, secret = key_prefix + secrets.token_hex(6), secrets.token_urlsafe(24)
    # Credentials by environment only: argv is visible to every user in /proc.
    env = {**os.environ, "ROOT_ACCESS_KEY_ID": access, "ROOT_SECRET_ACCESS_KEY": secret}
    argv = [str(tool("versitygw")), "--port", f"127.0.0.1:{port}", "posix", str(root / "data")]
    server = start("versitygw", argv, root / "versitygw.log", env)
    try:
        wait_until(server, lambda: port_open(port), 20, f"listening on port {port}")
        yield S3Server(f"http://127.0.0.1:{port}", access, secret, server.log)
    finally:
        terminate_group(server.process.pid)
        server.process.wait()
