"""Starting, probing and stopping the local cluster's component processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Every process the harness starts carries this variable, so `stop_run` can find
# stragglers (pods included) even after the launching process was killed.
RUN_MARKER = "LOCALCLUSTER_RUN_ID"


class ComponentError(RuntimeError):
    """A component failed to start; the message names it and shows its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now; the OS picks it so concurrent runs never collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


@dataclass
class Component:
    """One running component: its process and the log it writes."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def ensure_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise ComponentError(
                f"{self.name} exited with code {code}; last lines of {self.log}:\n{log_tail(self.log)}"
            )


def start(
    name: str,
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
) -> Component:
    """Starts a component in its own session so it can be signalled as a group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    return Component(name=name, process=process, log=log)


def wait_until(
    component: Component,
    ready: Callable[[], bool],
    timeout: float,
    what: str,
) -> None:
    """Polls `ready` until it holds, failing fast if the component dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        component.ensure_alive()
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.1)
    raise ComponentError(
        f"{component.name}: {what} not reached within {timeout:.0f}s; "
        f"last lines of {component.log}:\n{log_tail(component.log)}"
    )


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def terminate_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `grace`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        # A zombie child still answers kill(0); reap it if it is ours.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return Path(f"/proc/{pid}").exists() and _state(pid) != "Z"


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return stat.rsplit(")", 1)[1].split()[0]


def pids_of_run(run_id: str) -> list[int]:
    """Every live process whose environment carries this run's marker."""
    needle = f"{RUN_MARKER}={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_run(run_id: str, grace: float = 5.0) -> None:
    """Last line of defence: ends every process left behind by a run."""
    pids = pids_of_run(run_id)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
