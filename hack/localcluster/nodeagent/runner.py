"""One pod's life on the node: volumes, container processes, restarts, status and stop."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from localcluster.nodeagent.podspec import (
    Lookup,
    MountError,
    PodContext,
    container_argv,
    container_env,
    expand,
)
from localcluster.nodeagent.podspec import materialize_volume as materialize
from localcluster.processes import RUN_MARKER
from localcluster.tools import REPO_ROOT, tool

log = logging.getLogger("nodeagent")
Obj = dict[str, Any]
_SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_MAX_MESSAGE = 4096


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class NodeServices(Protocol):
    """What a runner needs from the agent."""

    lookup: Lookup
    node_name: str
    api_host: str
    api_port: int
    run_id: str

    def patch_status(self, pod: Obj, status: Obj) -> None: ...

    def event(self, pod: Obj, reason: str, message: str, kind: str = "Normal") -> None: ...

    def finalize_delete(self, pod: Obj) -> None: ...

    def pod_started(self, runner: PodRunner) -> None: ...

    def pod_stopped(self, runner: PodRunner) -> None: ...


@dataclass
class ContainerState:
    name: str
    restarts: int = 0
    process: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    last: Obj | None = None  # lastState.terminated
    terminated: Obj | None = None

    def status(self, image: str, ready: bool) -> Obj:
        if self.terminated is not None:
            state: Obj = {"terminated": self.terminated}
        elif self.process is not None:
            state = {"running": {"startedAt": self.started_at}}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        return {
            "name": self.name,
            "image": image,
            "imageID": "",
            "ready": ready and self.process is not None and self.terminated is None,
            "started": self.process is not None and self.terminated is None,
            "restartCount": self.restarts,
            "state": state,
            "lastState": {"terminated": self.last} if self.last else {},
        }


@dataclass
class PodRunner:
    pod: Obj
    pod_ip: str
    root: Path
    node: NodeServices
    containers: dict[str, ContainerState] = field(default_factory=dict)
    stop_requested: threading.Event = field(default_factory=threading.Event)
    killed: threading.Event = field(default_factory=threading.Event)
    grace: float = 30.0
    thread: threading.Thread | None = None

    @property
    def uid(self) -> str:
        return str(self.pod["metadata"]["uid"])

    @property
    def key(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    @property
    def hostname(self) -> str:
        return str(self.pod["spec"].get("hostname") or self.pod["metadata"]["name"])[:63]

    def log_path(self, container: str) -> Path:
        return self.root / "logs" / f"{container}.log"

    # -- control from the agent -------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run_safely, name=f"pod-{self.key}", daemon=True)
        self.thread.start()

    def request_stop(self, grace: float) -> None:
        self.grace = grace
        self.stop_requested.set()

    def kill_now(self) -> None:
        self.killed.set()
        self.request_stop(0)

    # -- the pod's life ---------------------------------------------------------
    def _run_safely(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s: runner failed", self.key)
        finally:
            self.node.pod_stopped(self)

    def _run(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        spec = self.pod["spec"]
        self._patch(phase="Pending")
        if not self._prepare_volumes():
            return self._finish_after_stop()
        self._hosts_mount()  # creates the hosts file the agent keeps current from now on
        self.node.pod_started(self)
        for init in spec.get("initContainers") or []:
            code = self._run_to_completion(init)
            if code != 0 or self.stop_requested.is_set():
                return self._finish(failed_init=True)
        self.containers = {c["name"]: ContainerState(c["name"]) for c in spec["containers"]}
        for container in spec["containers"]:
            self._launch(container)
        self._patch(phase="Running")
        self._supervise()
        self._finish()

    def _prepare_volumes(self) -> bool:
        """Retries like the kubelet until every volume can be built or the pod goes away."""
        warned = ""
        while not self.stop_requested.is_set():
            try:
                self._write_volumes()
                return True
            except MountError as exc:
                if str(exc) != warned:
                    self.node.event(self.pod, "FailedMount", f"MountVolume.SetUp failed: {exc}", "Warning")
                    warned = str(exc)
                self._patch(phase="Pending", waiting=("ContainerCreating", str(exc)))
            self.stop_requested.wait(2.0)
        return False

    def _ctx(self) -> PodContext:
        return PodContext(pod=self.pod, pod_ip=self.pod_ip, node_name=self.node.node_name)

    def _write_volumes(self) -> None:
        for volume in self.pod["spec"].get("volumes") or []:
            materialize(self._ctx(), volume, self._volume_dir(volume["name"]), self.node.lookup)

    def _volume_dir(self, name: str) -> Path:
        return self.root / "volumes" / name

    def _mounts(self, container: Obj) -> list[Obj]:
        volumes = {v["name"]: v for v in self.pod["spec"].get("volumes") or []}
        mounts = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            source: Path = (
                Path(volume["hostPath"]["path"]) if "hostPath" in volume else self._volume_dir(volume["name"])
            )
            if mount.get("subPath"):
                source = source / mount["subPath"]
            read_only = bool(mount.get("readOnly")) or any(
                k in volume for k in ("configMap", "secret", "projected")
            )
            mounts.append({"source": str(source), "target": mount["mountPath"], "readOnly": read_only})
        mounts.append(self._hosts_mount())
        mounts.append(
            {
                "source": str(self._termination_file(container)),
                "target": container.get("terminationMessagePath", "/dev/termination-log"),
                "readOnly": False,
            }
        )
        return mounts

    def _hosts_mount(self) -> Obj:
        hosts = self.root / "hosts"
        if not hosts.exists():
            hosts.write_text(f"127.0.0.1 localhost\n{self.pod_ip} {self.hostname}\n")
        return {"source": str(hosts), "target": "/etc/hosts", "readOnly": True}

    def _termination_file(self, container: Obj) -> Path:
        path = self.root / "termination" / str(container["name"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        return path

    def _process_env(self, container: Obj) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        base = {
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": self.hostname,
            "KUBERNETES_SERVICE_HOST": self.node.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.node.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.node.api_port),
            RUN_MARKER: self.node.run_id,
            # No PID namespace here, so tini is not PID 1: as a subreaper it still reaps orphans.
            "TINI_SUBREAPER": "1",
        }
        declared = container_env(self._ctx(), container, self.node.lookup)
        return base | declared

    def _launch(self, container: Obj) -> subprocess.Popen[bytes]:
        env = self._process_env(container)
        binaries = {"/usr/bin/tini": str(tool("tini"))}
        argv = [expand(a, env) for a in container_argv(container, REPO_ROOT, binaries)]
        if not argv:
            raise MountError(f"container {container['name']}: no command (images are not pulled here)")
        spec = {
            "mounts": self._mounts(container),
            "hostname": self.hostname,
            "workingDir": container.get("workingDir")
            or "/",  # no image, so no WORKDIR: the root, as for FROM scratch,
            "argv": argv,
            "env": env,
            # Images are not pulled: the process runs from these, which volumes must not hide.
            "keepVisible": sorted({sys.prefix, sys.base_prefix, str(REPO_ROOT)}),
        }
        spec_path = self.root / f"launch-{container['name']}.json"
        spec_path.write_text(json.dumps(spec))
        spec_path.chmod(0o600)
        log_path = self.log_path(container["name"])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--",
            sys.executable,
            "-m",
            "localcluster.nodeagent.launch",
            str(spec_path),
        ]
        with log_path.open("ab") as out:
            process = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**env, "PYTHONSAFEPATH": "1"},
                start_new_session=True,
            )
        state = self.containers.setdefault(container["name"], ContainerState(container["name"]))
        state.process, state.started_at, state.terminated = process, now(), None
        self.node.event(self.pod, "Started", f"Started container {container['name']}")
        return process

    def _run_to_completion(self, container: Obj) -> int:
        process = self._launch(container)
        while process.poll() is None and not self.stop_requested.is_set():
            time.sleep(0.2)
        if process.poll() is None:
            self._stop_process(process)
        return process.wait()

    def _supervise(self) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        specs = {c["name"]: c for c in self.pod["spec"]["containers"]}
        while not self.stop_requested.is_set():
            changed = False
            for state in self.containers.values():
                if state.process is None or state.terminated is not None:
                    continue
                code = state.process.poll()
                if code is None:
                    continue
                changed = True
                state.terminated = self._terminated(specs[state.name], code)
                if policy == "Always" or (policy == "OnFailure" and code != 0):
                    self._restart(specs[state.name], state)
            if changed:
                self._patch(phase="Running")
            if all(s.terminated is not None for s in self.containers.values()):
                return
            self.stop_requested.wait(0.2)
        self._stop_all()

    def _restart(self, container: Obj, state: ContainerState) -> None:
        delay = min(30.0, 2.0 ** min(state.restarts, 5))  # CrashLoopBackOff, shortened for tests
        self._patch(phase="Running")
        if self.stop_requested.wait(delay):
            return
        state.last, state.restarts = state.terminated, state.restarts + 1
        self._launch(container)

    def _terminated(self, container: Obj, code: int) -> Obj:
        if code < 0:  # killed by a signal: report it as the shell would
            code = 128 - code
        message = ""
        path = self.root / "termination" / container["name"]
        if path.exists():
            message = path.read_text(errors="replace")[:_MAX_MESSAGE]
        if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = self.log_path(container["name"]).read_text(errors="replace").splitlines()[-80:]
            message = "\n".join(lines)[-_MAX_MESSAGE:]
        state = self.containers.get(container["name"])
        terminated: Obj = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": state.started_at if state else now(),
            "finishedAt": now(),
        }
        if message:
            terminated["message"] = message
        return terminated

    def _stop_process(self, process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL if self.killed.is_set() else signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while process.poll() is None and time.monotonic() < deadline and not self.killed.is_set():
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def _stop_all(self) -> None:
        specs = {c["name"]: c for c in self.pod["spec"]["containers"]}
        running = [s for s in self.containers.values() if s.process and s.terminated is None]
        if running:
            self.node.event(
                self.pod, "Killing", "Stopping container(s) " + ", ".join(s.name for s in running)
            )
        threads = [
            threading.Thread(target=self._stop_process, args=(s.process,)) for s in running if s.process
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for state in running:
            assert state.process is not None
            state.terminated = self._terminated(specs[state.name], state.process.wait())

    def _finish(self, failed_init: bool = False) -> None:
        codes = [s.terminated["exitCode"] for s in self.containers.values() if s.terminated]
        phase = "Failed" if failed_init or any(codes) else "Succeeded"
        if not self.killed.is_set():
            self._patch(phase=phase)
        self._finish_after_stop()

    def _finish_after_stop(self) -> None:
        if self.stop_requested.is_set() and not self.killed.is_set():
            self.node.finalize_delete(self.pod)

    # -- status ------------------------------------------------------------------
    def _patch(self, phase: str, waiting: tuple[str, str] | None = None) -> None:
        specs = self.pod["spec"]["containers"]
        running = (
            phase == "Running"
            and all(s.process is not None and s.terminated is None for s in self.containers.values())
            and bool(self.containers)
        )
        statuses = []
        for c in specs:
            state = self.containers.get(c["name"], ContainerState(c["name"]))
            container_status = state.status(c.get("image", ""), running)
            if waiting and state.process is None:
                container_status["state"] = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
            statuses.append(container_status)
        ready = "True" if running else "False"
        status: Obj = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.pod.get("status", {}).get("startTime") or now(),
            "containerStatuses": statuses,
            "conditions": [
                {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": now()},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now()},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": now()},
                {"type": "Ready", "status": ready, "lastTransitionTime": now()},
            ],
        }
        self.pod.setdefault("status", {})["startTime"] = status["startTime"]
        self.node.patch_status(self.pod, status)
