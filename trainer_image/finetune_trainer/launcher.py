"""One trainer process per GPU in a pod, started by the pod's own trainer process.

The operator sets NPROC_PER_NODE (the job's gpusPerNode) next to the rendezvous variables. When
it is above 1, `python -m finetune_trainer` becomes this launcher: it starts that many copies of
itself with RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE set as torchrun sets them, forwards
SIGTERM to all of them and exits with the code that explains the pod's end.

Why not torchrun: its agent gives workers 30 s after SIGTERM before killing them, where a rank
needs the pod's whole grace period to save and upload its checkpoint part; and it turns every
worker failure into exit 1, where the Job's pod failure policy reads the trainer's own exit codes
(a diverged run is final, a preempted one resumes). On CPU, where there is no GPU to count, the
launcher starts NPROC_PER_NODE processes all the same: that is how the tests run several ranks.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from finetune_trainer.config import ConfigError

log = logging.getLogger(__name__)
PROCS_ENV = "NPROC_PER_NODE"
DEFAULT_PORT = 29500
# After one rank fails on its own, the others wait on collectives that never complete: they get
# SIGTERM (nothing new to checkpoint outside a step) and this long before SIGKILL.
PEER_STOP_S = 30.0
POLL_S = 0.2


@dataclass(frozen=True)
class Plan:
    procs: int
    nodes: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.procs * self.nodes


def _positive(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < minimum:
        raise ConfigError(
            [f"env {name}: got {raw!r}: must be an integer >= {minimum} (fix: let the operator set it)"]
        )
    return int(raw)


def plan_from_env(env: Mapping[str, str]) -> Plan | None:
    """The processes this pod starts; None when it runs one (or a launcher already started it)."""
    if "LOCAL_RANK" in env:
        return None  # a rank: started by this launcher or by torchrun
    procs = _positive(env, PROCS_ENV, 1)
    if procs == 1:
        return None
    nodes = _positive(env, "NNODES", 1)
    node_rank = _positive(env, "NODE_RANK", 0, minimum=0)
    if node_rank >= nodes:
        raise ConfigError(
            [f"env NODE_RANK: got {node_rank}: must be below NNODES {nodes} (fix: let the operator set it)"]
        )
    # One pod: its own address (pods may share a host's network in small clusters).
    addr = env.get("MASTER_ADDR") or env.get("POD_IP") or "127.0.0.1"
    return Plan(procs, nodes, node_rank, addr, _positive(env, "MASTER_PORT", DEFAULT_PORT))


def rank_env(plan: Plan, local_rank: int) -> dict[str, str]:
    """The variables one rank reads, as torchrun sets them."""
    return {
        "RANK": str(plan.node_rank * plan.procs + local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(plan.world_size),
        "LOCAL_WORLD_SIZE": str(plan.procs),
        "NNODES": str(plan.nodes),
        "NODE_RANK": str(plan.node_rank),
        "MASTER_ADDR": plan.master_addr,
        "MASTER_PORT": str(plan.master_port),
    }


@dataclass(frozen=True)
class Exit:
    local_rank: int
    code: int  # as Popen reports it: negative for a signal
    stopped_by_launcher: bool = False


def shell_code(code: int) -> int:
    """A rank killed by a signal ends the pod as a shell would report it (SIGKILL: 137)."""
    return 128 - code if code < 0 else code


def pod_exit_code(exits: Sequence[Exit]) -> int:
    """`exits` in the order the ranks ended. The first rank that failed on its own explains the
    pod; ranks the launcher stopped because of it do not. A SIGTERM to the pod reaches every rank,
    so then the first to end says how (checkpointed, or stopped outside training)."""
    for end in exits:
        if end.code != 0 and not end.stopped_by_launcher:
            return shell_code(end.code)
    failed = [e for e in exits if e.code != 0]
    return shell_code(failed[0].code) if failed else 0


TRAINER = (sys.executable, "-m", "finetune_trainer")


class Launcher:
    def __init__(
        self, plan: Plan, argv: Sequence[str], env: Mapping[str, str], command: Sequence[str] = TRAINER
    ) -> None:
        self.plan, self.argv, self.env, self.command = plan, list(argv), dict(env), list(command)
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.exits: list[Exit] = []
        self.stopping: set[int] = set()
        self.signalled = False

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        p = self.plan
        first = p.node_rank * p.procs
        log.info(
            "launching %d trainer processes in this pod: ranks %d-%d of world size %d (%d pods)",
            *(p.procs, first, first + p.procs - 1, p.world_size, p.nodes),
        )
        for local_rank in range(p.procs):
            env = {**self.env, **rank_env(p, local_rank)}
            self.children[local_rank] = subprocess.Popen([*self.command, *self.argv], env=env)
        deadline: float | None = None
        while len(self.exits) < len(self.children):
            deadline = self._reap(deadline)
            time.sleep(POLL_S)
        code = pod_exit_code(self.exits)
        log.info("all %d trainer processes ended: exit code %d", p.procs, code)
        return code

    def _reap(self, deadline: float | None) -> float | None:
        ended = {e.local_rank for e in self.exits}
        for local_rank, child in self.children.items():
            code = child.poll()
            if local_rank in ended or code is None:
                continue
            self.exits.append(Exit(local_rank, code, local_rank in self.stopping))
            if code != 0 and not self.signalled and not self.stopping:
                log.error("rank process %d ended with code %d: stopping the others", local_rank, code)
                self._stop_others()
                deadline = time.monotonic() + PEER_STOP_S
        if deadline is not None and time.monotonic() > deadline:
            for child in self._running():
                child.kill()
        return deadline

    def _running(self) -> list[subprocess.Popen[bytes]]:
        return [c for c in self.children.values() if c.poll() is None]

    def _stop_others(self) -> None:
        for local_rank, child in self.children.items():
            if child.poll() is None:
                self.stopping.add(local_rank)
                child.send_signal(signal.SIGTERM)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        """The pod's grace period is every rank's: each saves its own part, then exits."""
        self.signalled = True
        for child in self._running():
            child.send_signal(signum)


def launch(plan: Plan, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    return Launcher(plan, argv, os.environ if env is None else env).run()
