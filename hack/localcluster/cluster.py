"""The local cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
an S3-compatible server, Prometheus and the process node agent, in one run directory."""

from __future__ import annotations

import json
import os
import secrets
import ssl
import sys
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from localcluster import processes
from localcluster.pki import Pki, create_pki
from localcluster.processes import Component, free_port, port_open, wait_until
from localcluster.tools import check_all

STATE_FILE = "state.json"


@dataclass
class ClusterOptions:
    """What to start and how. Defaults suit tests on a small machine."""

    run_dir: Path
    node_name: str = "local-node"
    gpus: int = 4
    gpu_memory_gib: int = 80
    cpus: int = 16
    memory_gib: int = 64
    with_s3: bool = True
    with_prometheus: bool = True
    scrape_interval: str = "2s"
    start_timeout: float = 60.0
    # The pdeath watchdog is for pytest: components die with the test process.
    tie_to_parent: bool = False


@dataclass
class ClusterInfo:
    """Everything a client needs to use a running cluster; saved as state.json."""

    run_id: str
    run_dir: str
    kubeconfig: str
    apiserver_url: str
    ca_cert: str
    etcd_url: str
    node_name: str
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    prometheus_url: str = ""
    pids: dict[str, int] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Variables a shell or a child process uses to reach the cluster."""
        out = {"KUBECONFIG": self.kubeconfig, "LOCALCLUSTER_RUN_DIR": self.run_dir}
        if self.s3_endpoint:
            out["S3_ENDPOINT_URL"] = self.s3_endpoint
        if self.prometheus_url:
            out["PROMETHEUS_URL"] = self.prometheus_url
        return out

    def save(self) -> None:
        path = Path(self.run_dir) / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        path.chmod(0o600)

    @classmethod
    def load(cls, run_dir: Path) -> ClusterInfo:
        data = json.loads((run_dir / STATE_FILE).read_text())
        return cls(**data)


class LocalCluster:
    """Starts and stops one local cluster. Use as a context manager or call start/stop."""

    def __init__(self, options: ClusterOptions) -> None:
        self.options = options
        self.run_dir = options.run_dir.resolve()
        self.run_id = uuid.uuid4().hex[:12]
        self.components: list[Component] = []
        self.info: ClusterInfo | None = None

    def __enter__(self) -> ClusterInfo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> ClusterInfo:
        tools = check_all()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            info = self._start_all(tools)
        except BaseException:
            self.stop()
            raise
        self.info = info
        info.save()
        return info

    def stop(self) -> None:
        # Reverse order: the node agent stops its pods before the API server goes away.
        for component in reversed(self.components):
            processes.terminate_group(component.pid, grace=15.0 if component.name == "node-agent" else 5.0)
            if component.process.poll() is None:
                component.process.wait(timeout=5)
        self.components.clear()
        processes.kill_run(self.run_id)

    # -- components ------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        env[processes.RUN_MARKER] = self.run_id
        return env

    def _start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Component:
        argv = self._tie(argv)
        env = self._env() | (extra_env or {})
        component = processes.start(name, argv, self.run_dir / "logs" / f"{name}.log", env)
        self.components.append(component)
        return component

    def _tie(self, argv: list[str]) -> list[str]:
        if not self.options.tie_to_parent:
            return argv
        # setpriv's --pdeathsig ends the component if the test process dies abruptly.
        return ["setpriv", "--pdeathsig", "TERM", "--", *argv]

    def _start_all(self, tools: dict[str, Path]) -> ClusterInfo:
        started = time.monotonic()
        pki = create_pki(self.run_dir / "pki")
        etcd_url = self._start_etcd(tools["etcd"])
        api_port = self._start_apiserver(tools["kube-apiserver"], pki, etcd_url)
        api_url = f"https://127.0.0.1:{api_port}"
        kubeconfig = self._write_kubeconfig(pki, api_url)
        self._start_controller_manager(tools["kube-controller-manager"], pki, kubeconfig)
        self._start_scheduler(tools["kube-scheduler"], kubeconfig)
        info = ClusterInfo(
            run_id=self.run_id,
            run_dir=str(self.run_dir),
            kubeconfig=str(kubeconfig),
            apiserver_url=api_url,
            ca_cert=str(pki.ca_cert),
            etcd_url=etcd_url,
            node_name=self.options.node_name,
        )
        if self.options.with_s3:
            self._start_s3(tools["versitygw"], info)
        if self.options.with_prometheus:
            self._start_prometheus(tools["prometheus"], info)
        self._start_node_agent(info)
        info.pids = {c.name: c.pid for c in self.components}
        self._wait_node_ready(kubeconfig)
        self._log(f"cluster ready in {time.monotonic() - started:.1f}s")
        return info

    def _log(self, message: str) -> None:
        with (self.run_dir / "logs" / "harness.log").open("a") as out:
            out.write(f"{time.strftime('%H:%M:%S')} {message}\n")

    def _start_etcd(self, binary: Path) -> str:
        client, peer = free_port(), free_port()
        url = f"http://127.0.0.1:{client}"
        argv = [
            str(binary),
            "--name=local",
            f"--data-dir={self.run_dir / 'etcd'}",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=local=http://127.0.0.1:{peer}",
            "--log-level=warn",
            # Tests throw the data away; fsync only slows them down.
            "--unsafe-no-fsync",
        ]
        component = self._start("etcd", argv)
        wait_until(component, lambda: _http_ok(f"{url}/health"), self.options.start_timeout, "/health")
        return url

    def _start_apiserver(self, binary: Path, pki: Pki, etcd_url: str) -> int:
        port = free_port()
        argv = [
            str(binary),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.run_dir / 'pki'}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--endpoint-reconciler-type=none",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ]
        component = self._start("kube-apiserver", argv)
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        wait_until(
            component,
            lambda: _http_ok(f"https://127.0.0.1:{port}/readyz", ctx),
            self.options.start_timeout,
            "/readyz",
        )
        return port

    def _write_kubeconfig(self, pki: Pki, api_url: str) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "local", "cluster": {"server": api_url, "certificate-authority": str(pki.ca_cert)}}
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(pki.admin_cert),
                        "client-key": str(pki.admin_key),
                    },
                }
            ],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
            "current-context": "local",
        }
        path = self.run_dir / "kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def _start_controller_manager(self, binary: Path, pki: Pki, kubeconfig: Path) -> None:
        port = free_port()
        argv = [
            str(binary),
            *_controller_flags(kubeconfig, port),
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
            # Ready pods and finished Jobs should show up promptly in tests.
            "--concurrent-job-syncs=5",
            "--node-monitor-grace-period=40s",
            "--v=1",
        ]
        component = self._start("kube-controller-manager", argv)
        wait_until(component, lambda: port_open(port), self.options.start_timeout, "its secure port")

    def _start_scheduler(self, binary: Path, kubeconfig: Path) -> None:
        port = free_port()
        argv = [str(binary), *_controller_flags(kubeconfig, port), "--v=1"]
        component = self._start("kube-scheduler", argv)
        wait_until(component, lambda: port_open(port), self.options.start_timeout, "its secure port")

    def _start_s3(self, binary: Path, info: ClusterInfo) -> None:
        port = free_port()
        data = self.run_dir / "s3"
        data.mkdir(parents=True, exist_ok=True)
        # Fresh credentials per run: nothing secret is shared between runs.
        info.s3_access_key = "lc" + secrets.token_hex(8)
        info.s3_secret_key = secrets.token_urlsafe(24)
        argv = [str(binary), "--port", f"127.0.0.1:{port}", "posix", str(data)]
        # Credentials go by environment, never argv (visible to every user in /proc).
        keys = {"ROOT_ACCESS_KEY_ID": info.s3_access_key, "ROOT_SECRET_ACCESS_KEY": info.s3_secret_key}
        component = self._start("s3", argv, keys)
        wait_until(component, lambda: port_open(port), self.options.start_timeout, "its port")
        info.s3_endpoint = f"http://127.0.0.1:{port}"

    def _start_prometheus(self, binary: Path, info: ClusterInfo) -> None:
        port = free_port()
        root = self.run_dir / "prometheus"
        targets = root / "targets"
        targets.mkdir(parents=True, exist_ok=True)
        config = prometheus_config(targets, self.options.scrape_interval)
        (root / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [
            str(binary),
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=1d",
            "--log.level=warn",
        ]
        component = self._start("prometheus", argv)
        url = f"http://127.0.0.1:{port}"
        wait_until(component, lambda: _http_ok(f"{url}/-/ready"), self.options.start_timeout, "/-/ready")
        info.prometheus_url = url

    def _start_node_agent(self, info: ClusterInfo) -> None:
        argv = [
            sys.executable,
            "-m",
            "localcluster.nodeagent",
            "--kubeconfig",
            info.kubeconfig,
            "--run-dir",
            info.run_dir,
            "--node-name",
            info.node_name,
            "--gpus",
            str(self.options.gpus),
            "--gpu-memory-gib",
            str(self.options.gpu_memory_gib),
            "--cpus",
            str(self.options.cpus),
            "--memory-gib",
            str(self.options.memory_gib),
            "--apiserver",
            info.apiserver_url,
            "--ca-cert",
            info.ca_cert,
        ]
        self._start("node-agent", argv)

    def _wait_node_ready(self, kubeconfig: Path) -> None:
        from kubernetes import client, config  # local import: the CLI's `env` needs no client

        api = client.CoreV1Api(config.new_client_from_config(str(kubeconfig)))
        agent = next(c for c in self.components if c.name == "node-agent")

        def ready() -> bool:
            node = api.read_node(self.options.node_name)
            conditions = node.status.conditions or []
            return any(c.type == "Ready" and c.status == "True" for c in conditions)

        wait_until(agent, ready, self.options.start_timeout, f"node {self.options.node_name} Ready")
        # Pods cannot be created until the controller-manager made the default ServiceAccount.
        manager = next(c for c in self.components if c.name == "kube-controller-manager")
        wait_until(
            manager,
            lambda: bool(api.read_namespaced_service_account("default", "default")),
            self.options.start_timeout,
            "ServiceAccount default/default",
        )


def _controller_flags(kubeconfig: Path, port: int) -> list[str]:
    """What the controller-manager and the scheduler share: admin credentials, a loopback
    secure port, and a single instance (no leader election)."""
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        "--leader-elect=false",
    ]


def prometheus_config(targets: Path, interval: str) -> dict[str, Any]:
    """Scrape jobs fed by files the harness and the node agent keep current."""
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                # Pods expose their own `job` label (the FineTuneJob name): keep it.
                "job_name": "pods",
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets / "pods*.json")], "refresh_interval": "1s"}],
            },
            {
                "job_name": "operator",
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets / "operator*.json")], "refresh_interval": "1s"}],
            },
        ],
    }


def scrape_interval(run_dir: Path) -> str:
    """The stack's Prometheus scrape interval (a duration such as 2s); 0s when it runs none."""
    config = run_dir / "prometheus" / "prometheus.yml"
    if not config.is_file():
        return "0s"
    return str(yaml.safe_load(config.read_text())["global"]["scrape_interval"])


def add_scrape_target(run_dir: Path, name: str, address: str, labels: dict[str, str]) -> None:
    """Makes Prometheus scrape `address` (host:port) under the `operator` job, e.g. an operator
    running outside the cluster."""
    path = run_dir / "prometheus" / "targets" / f"operator-{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": [address], "labels": labels}]))
    tmp.replace(path)


def stop_run(run_dir: Path) -> bool:
    """Stops a cluster started by another process (the CLI's `down`). False when none runs."""
    try:
        info = ClusterInfo.load(run_dir)
    except FileNotFoundError:
        return False
    order = ["node-agent", "prometheus", "s3", "kube-scheduler", "kube-controller-manager"]
    order += ["kube-apiserver", "etcd"]
    for name in order:
        pid = info.pids.get(name)
        if pid:
            processes.terminate_group(pid, grace=15.0 if name == "node-agent" else 5.0)
    processes.kill_run(info.run_id)
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    return True


def _http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=ctx) as response:  # noqa: S310 (local URL)
        return bool(response.status == 200)
