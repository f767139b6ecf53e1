"""The process node agent: a stand-in for the kubelet that runs bound pods as local processes.

It registers a Node, keeps its Lease and Ready condition fresh, watches pods bound to it,
and gives each pod a loopback IP (127.0.0.x), its own service-account token, volumes and
a log file under the run directory."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from localcluster.nodeagent.podspec import Lookup, decode_secret_data
from localcluster.nodeagent.runner import Obj, PodRunner, now
from localcluster.processes import RUN_MARKER

log = logging.getLogger("nodeagent")
_HEARTBEAT_SECONDS = 10
TERMINAL = ("Succeeded", "Failed")


class ApiLookup:
    """Reads secrets, config maps and tokens for pods, as the kubelet does."""

    def __init__(self, core: Any, ca_cert: Path) -> None:
        self.core = core
        self.ca_cert = ca_cert

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            return decode_secret_data(self.core.read_namespaced_secret(name, namespace).data)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def token(
        self, namespace: str, service_account: str, pod: Obj, audience: str | None, seconds: int
    ) -> str:
        body = {
            "spec": {
                "audiences": [audience] if audience else None,
                "expirationSeconds": max(seconds, 600),
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod["metadata"]["name"],
                    "uid": pod["metadata"]["uid"],
                },
            }
        }
        try:
            result = self.core.create_namespaced_service_account_token(service_account, namespace, body)
        except ApiException as exc:
            from localcluster.nodeagent.podspec import MountError

            raise MountError(f'service account token for "{service_account}": {exc.reason}') from exc
        return str(result.status.token)

    def root_ca(self) -> str:
        return self.ca_cert.read_text()


class NodeAgent:
    def __init__(self, args: Any) -> None:
        api = config.new_client_from_config(args.kubeconfig)
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.api_client = api
        self.node_name: str = args.node_name
        self.run_dir = Path(args.run_dir)
        self.run_id = os.environ.get(RUN_MARKER, "")
        url = args.apiserver.removeprefix("https://")
        self.api_host, port = url.rsplit(":", 1)
        self.api_port = int(port)
        self.lookup: Lookup = ApiLookup(self.core, Path(args.ca_cert))
        self.args = args
        self.runners: dict[str, PodRunner] = {}
        # A pod runs once: its last status, re-sent if the API server has not taken it yet.
        self.finished: dict[str, Obj] = {}
        self.lock = threading.Lock()
        self.network_lock = threading.Lock()
        self.free_ips = [str(ipaddress.ip_address("127.0.1.0") + i) for i in range(2, 254)]
        self.stopping = threading.Event()

    # -- node registration -----------------------------------------------------------
    def register(self) -> None:
        gib = 2**30
        capacity = {
            "cpu": str(self.args.cpus),
            "memory": str(self.args.memory_gib * gib),
            "pods": "110",
            "ephemeral-storage": str(100 * gib),
            "nvidia.com/gpu": str(self.args.gpus),
        }
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            # Same label NVIDIA's GPU feature discovery sets (MiB per GPU).
            "nvidia.com/gpu.memory": str(self.args.gpu_memory_gib * 1024),
            "nvidia.com/gpu.count": str(self.args.gpus),
        }
        body = {"metadata": {"name": self.node_name, "labels": labels}, "spec": {}}
        with contextlib.suppress(ApiException):
            self.core.create_node(body)
        status = {"status": {"capacity": capacity, "allocatable": capacity, **self._status()}}
        self.core.patch_node_status(self.node_name, status)

    def _status(self) -> Obj:
        stamp = now()
        return {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "process node agent is posting ready status",
                    "lastHeartbeatTime": stamp,
                    "lastTransitionTime": stamp,
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "process-node-agent",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "process://local",
                "kernelVersion": os.uname().release,
                "osImage": "local processes",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    def heartbeat_forever(self) -> None:
        while not self.stopping.wait(_HEARTBEAT_SECONDS):
            try:
                self._renew_lease()
                self.core.patch_node_status(self.node_name, {"status": self._status()})
            except Exception:
                log.exception("heartbeat failed")

    def _renew_lease(self) -> None:
        stamp = datetime.datetime.now(datetime.UTC)
        body = {
            "metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": stamp},
        }
        try:
            self.coordination.patch_namespaced_lease(self.node_name, "kube-node-lease", body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", body)

    # -- services for runners ----------------------------------------------------------
    def patch_status(self, pod: Obj, status: Obj) -> None:
        meta = pod["metadata"]
        if status.get("phase") in TERMINAL:
            with self.lock:
                self.finished[meta["uid"]] = status
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})
        except ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("pod %s/%s: status patch failed: %s", meta["namespace"], meta["name"], exc.body)

    def event(self, pod: Obj, reason: str, message: str, kind: str = "Normal") -> None:
        meta = pod["metadata"]
        stamp = datetime.datetime.now(datetime.UTC)
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": "kubelet", "host": self.node_name},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        with contextlib.suppress(ApiException):
            self.core.create_namespaced_event(meta["namespace"], body)

    def finalize_delete(self, pod: Obj) -> None:
        meta = pod["metadata"]
        options = client.V1DeleteOptions(grace_period_seconds=0, preconditions={"uid": meta["uid"]})
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=options)

    def pod_started(self, runner: PodRunner) -> None:
        self._refresh_network()

    def pod_stopped(self, runner: PodRunner) -> None:
        with self.lock:
            if self.runners.get(runner.uid) is runner:
                del self.runners[runner.uid]
                self.free_ips.append(runner.pod_ip)
        self._refresh_network()

    def _refresh_network(self) -> None:
        """Rewrites every pod's /etc/hosts (headless-service names) and Prometheus' pod targets.
        Under the network lock: pods starting together must not interleave these writes."""
        with self.lock:
            runners = list(self.runners.values())
        with self.network_lock:
            # Pods still preparing their volumes have no hosts file yet; they get one at start.
            started = [r for r in runners if (r.root / "hosts").exists()]
            for runner in started:
                _write_in_place(runner.root / "hosts", _hosts_file(runner, started))
            _write_targets(self.run_dir / "prometheus" / "targets" / "pods.json", started)

    # -- pod watch -----------------------------------------------------------------------
    def watch_forever(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        while not self.stopping.is_set():
            try:
                pods = self.api_client.sanitize_for_serialization(
                    self.core.list_pod_for_all_namespaces(field_selector=selector)
                )
                for pod in pods["items"]:
                    self.handle(pod, "SYNC")
                stream = watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=pods["metadata"]["resourceVersion"],
                    timeout_seconds=60,
                )
                for event in stream:
                    pod = self.api_client.sanitize_for_serialization(event["object"])
                    self.handle(pod, event["type"])
                    if self.stopping.is_set():
                        break
            except Exception:
                if not self.stopping.is_set():
                    log.exception("pod watch failed; relisting")
                    time.sleep(1)

    def handle(self, pod: Obj, kind: str) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            runner = self.runners.get(uid)
        if kind == "DELETED":
            if runner:
                runner.kill_now()
            with self.lock:
                self.finished.pop(uid, None)
            return
        deleting = pod["metadata"].get("deletionTimestamp")
        with self.lock:
            final = self.finished.get(uid) if runner is None else None
        if final is not None:
            # Never run a finished pod again (restartPolicy is the runner's business), even when
            # its last status patch was lost: send it again instead.
            if deleting:
                self.finalize_delete(pod)
            elif (pod.get("status") or {}).get("phase") not in TERMINAL:
                self.patch_status(pod, final)
            return
        if runner is not None:
            if deleting:
                runner.request_stop(float(pod["metadata"].get("deletionGracePeriodSeconds") or 0))
            return
        phase = (pod.get("status") or {}).get("phase")
        if deleting or phase in ("Succeeded", "Failed"):
            if deleting:
                self.finalize_delete(pod)
            return
        self._start(pod)

    def _start(self, pod: Obj) -> None:
        with self.lock:
            if not self.free_ips:
                log.error("no free pod IPs left on %s", self.node_name)
                return
            ip = self.free_ips.pop(0)
            root = (
                self.run_dir
                / "pods"
                / f"{pod['metadata']['namespace']}_{pod['metadata']['name']}_{pod['metadata']['uid'][:8]}"
            )
            runner = PodRunner(pod=pod, pod_ip=ip, root=root, node=self)
            self.runners[runner.uid] = runner
        runner.start()

    def shutdown(self) -> None:
        """Stops every pod with its grace period, as a draining kubelet would."""
        self.stopping.set()
        with self.lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.request_stop(float(runner.pod["spec"].get("terminationGracePeriodSeconds", 30)))
        for runner in runners:
            if runner.thread:
                runner.thread.join(timeout=35)


def _hosts_file(runner: PodRunner, runners: list[PodRunner]) -> str:
    lines = ["127.0.0.1 localhost", f"{runner.pod_ip} {runner.hostname}"]
    namespace = runner.pod["metadata"]["namespace"]
    for other in runners:
        subdomain = other.pod["spec"].get("subdomain")
        if not subdomain or other.pod["metadata"]["namespace"] != namespace:
            continue
        short = f"{other.hostname}.{subdomain}"
        fqdn = f"{short}.{namespace}.svc.cluster.local"
        lines.append(f"{other.pod_ip} {fqdn} {short}.{namespace}.svc {short}.{namespace} {short}")
    return "\n".join(lines) + "\n"


def _write_in_place(path: Path, text: str) -> None:
    # Bind mounts pin the inode: rewrite the file, never replace it.
    if not path.exists():
        path.write_text(text)
        return
    with path.open("r+") as out:
        out.seek(0)
        out.write(text)
        out.truncate()


def _metrics_port(pod: Obj) -> int | None:
    annotations = pod["metadata"].get("annotations") or {}
    if annotations.get("prometheus.io/scrape") == "true" and annotations.get("prometheus.io/port"):
        return int(annotations["prometheus.io/port"])
    for container in pod["spec"]["containers"]:
        for port in container.get("ports") or []:
            if port.get("name") == "metrics":
                return int(port["containerPort"])
    return None


def _write_targets(path: Path, runners: list[PodRunner]) -> None:
    if not path.parent.exists():
        return
    groups = []
    for runner in runners:
        port = _metrics_port(runner.pod)
        if port is None:
            continue
        meta = runner.pod["metadata"]
        labels = {"namespace": meta["namespace"], "pod": meta["name"]}
        groups.append({"targets": [f"{runner.pod_ip}:{port}"], "labels": labels})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups))
    tmp.replace(path)
