"""Operator processes (`python -m finetune_operator`) against the local cluster, for tests that
start, kill and restart them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcluster.cluster import ClusterInfo
from localcluster.processes import free_port, port_open
from localcluster.testing import wait_for

# Namespaces whose names start with this are left to operators a test starts itself: the session's
# shared operator skips them, so a test there proves what its own operators did.
SOLO_PREFIX = "solo-"


@dataclass
class OperatorProcess:
    process: subprocess.Popen[bytes]
    log: Path
    health_port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self) -> dict[str, Any]:
        """/healthz as JSON: kopf's probes (the answer is 500 once a probe fails)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=5) as reply:
            return dict(json.loads(reply.read()))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_operator(
    cluster: ClusterInfo, log: Path, env: Mapping[str, str], *, pdeathsig: str = "KILL"
) -> OperatorProcess:
    """Starts the operator with the cluster's credentials and `env` on top; returns once /healthz
    answers (every replica serves it, leader or not)."""
    health = free_port()
    full_env = {**os.environ, **cluster.env(), "FINETUNE_OPERATOR_HEALTH_PORT": str(health), **env}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["setpriv", "--pdeathsig", pdeathsig, "--", sys.executable, "-m", "finetune_operator"],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = OperatorProcess(process, log, health)
    try:
        wait_for(
            lambda: port_open(health),
            60,
            "the operator's health endpoint",
            describe=lambda: running.log_text()[-2000:],
        )
    except BaseException:
        running.stop()
        raise
    return running
