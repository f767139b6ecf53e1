"""The local cluster behaves like Kubernetes: real control plane, pods run as processes."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from kubernetes import client

from localcluster import ClusterInfo
from localcluster.testing import events_for, pod_log, unique_name, wait_for
from localcluster.tools import HACK_DIR, tool

pytestmark = pytest.mark.cluster


def python_pod(name: str, code: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "python", "command": ["python", "-c", textwrap.dedent(code)]}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def phase_is(core: client.CoreV1Api, ns: str, name: str, *phases: str) -> Any:
    pod = core.read_namespaced_pod(name, ns)
    return pod if pod.status.phase in phases else None


def kubectl(cluster: ClusterInfo, *args: str) -> str:
    out = subprocess.run(
        [str(tool("kubectl")), "--kubeconfig", cluster.kubeconfig, *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout


def test_kubectl_reports_pinned_version_and_ready_gpu_node(cluster: ClusterInfo) -> None:
    pinned = re.search(r"k8s.io/kubernetes (v[0-9.]+)", (HACK_DIR / "tools/kubernetes/go.mod").read_text())
    assert pinned
    version = json.loads(kubectl(cluster, "version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == pinned.group(1)

    nodes = json.loads(kubectl(cluster, "get", "nodes", "-o", "json"))["items"]
    assert [n["metadata"]["name"] for n in nodes] == [cluster.node_name]
    ready = {c["type"]: c["status"] for c in nodes[0]["status"]["conditions"]}
    assert ready["Ready"] == "True"
    assert int(nodes[0]["status"]["capacity"]["nvidia.com/gpu"]) >= 1


def test_pod_success_and_failure_report_exit_codes(core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_pod(namespace, python_pod("ok", "print('done')"))
    failing = """
        import sys
        open('/dev/termination-log', 'w').write('dataset missing: s3://x/y')
        sys.exit(3)
    """
    core.create_namespaced_pod(namespace, python_pod("bad", failing))

    ok = wait_for(lambda: phase_is(core, namespace, "ok", "Succeeded", "Failed"), 120, "pod ok to finish")
    assert ok.status.phase == "Succeeded"
    assert ok.status.container_statuses[0].state.terminated.exit_code == 0

    bad = wait_for(lambda: phase_is(core, namespace, "bad", "Succeeded", "Failed"), 120, "pod bad to finish")
    terminated = bad.status.container_statuses[0].state.terminated
    assert bad.status.phase == "Failed"
    assert terminated.exit_code == 3
    assert terminated.message == "dataset missing: s3://x/y"


def test_job_completes_and_indexed_job_runs_every_index(
    kube: client.ApiClient, cluster: ClusterInfo, namespace: str
) -> None:
    batch = client.BatchV1Api(kube)
    core = client.CoreV1Api(kube)
    template = python_pod("x", "import os; print('index', os.environ.get('JOB_COMPLETION_INDEX'))")
    template["spec"]["restartPolicy"] = "Never"
    pod_template = {"spec": template["spec"]}
    batch.create_namespaced_job(
        namespace, {"metadata": {"name": "plain"}, "spec": {"template": pod_template}}
    )
    indexed = {
        "metadata": {"name": "indexed"},
        "spec": {"completions": 2, "parallelism": 2, "completionMode": "Indexed", "template": pod_template},
    }
    batch.create_namespaced_job(namespace, indexed)

    for name in ("plain", "indexed"):
        wait_for(
            lambda name=name: (
                (batch.read_namespaced_job_status(name, namespace).status.succeeded or 0)
                >= (2 if name == "indexed" else 1)
            ),
            180,
            f"job {name} to succeed",
        )
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=indexed").items
    logs = "".join(pod_log(cluster.run_dir, namespace, p.metadata.name) for p in pods)
    assert sorted(re.findall(r"index (\d)", logs)) == ["0", "1"]


def test_deleting_owner_collects_children(kube: client.ApiClient, namespace: str) -> None:
    batch = client.BatchV1Api(kube)
    core = client.CoreV1Api(kube)
    spec = python_pod("x", "import time; time.sleep(300)")["spec"]
    batch.create_namespaced_job(
        namespace, {"metadata": {"name": "owner"}, "spec": {"template": {"spec": spec}}}
    )
    wait_for(
        lambda: core.list_namespaced_pod(namespace, label_selector="job-name=owner").items, 120, "job pod"
    )
    batch.delete_namespaced_job("owner", namespace, propagation_policy="Background")
    wait_for(
        lambda: not core.list_namespaced_pod(namespace, label_selector="job-name=owner").items,
        180,
        "the garbage collector to delete the job's pods",
    )


def test_deleting_running_pod_sends_sigterm_within_grace(
    core: client.CoreV1Api, cluster: ClusterInfo, namespace: str
) -> None:
    code = """
        import signal, sys, time
        def on_term(signum, frame):
            print('got SIGTERM, saving checkpoint', flush=True)
            time.sleep(1)
            print('checkpoint saved', flush=True)
            sys.exit(75)
        signal.signal(signal.SIGTERM, on_term)
        print('training', flush=True)
        time.sleep(300)
    """
    core.create_namespaced_pod(namespace, python_pod("trainer", code, terminationGracePeriodSeconds=20))
    wait_for(
        lambda: "training" in pod_log(cluster.run_dir, namespace, "trainer"), 120, "the process to start"
    )
    core.delete_namespaced_pod("trainer", namespace)
    wait_for(
        lambda: "checkpoint saved" in pod_log(cluster.run_dir, namespace, "trainer"),
        30,
        "the process to handle SIGTERM",
        describe=lambda: pod_log(cluster.run_dir, namespace, "trainer"),
    )

    def gone() -> bool:
        return not [p for p in core.list_namespaced_pod(namespace).items if p.metadata.name == "trainer"]

    wait_for(gone, 30, "the pod to be removed after its process exited")


def test_gpu_requests_schedule_within_capacity_only(core: client.CoreV1Api, namespace: str) -> None:
    def gpu_pod(name: str, gpus: int) -> dict[str, Any]:
        resources = {"limits": {"nvidia.com/gpu": str(gpus)}}
        return python_pod(name, "print('gpu')", container={"resources": resources})

    core.create_namespaced_pod(namespace, gpu_pod("fits", 1))
    core.create_namespaced_pod(namespace, gpu_pod("too-big", 999))
    wait_for(lambda: phase_is(core, namespace, "fits", "Succeeded"), 120, "the 1-GPU pod to run")
    reasons = wait_for(
        lambda: [e for e in events_for(core, namespace, "too-big") if e.startswith("FailedScheduling")],
        120,
        "a FailedScheduling event",
    )
    assert "nvidia.com/gpu" in reasons[0]
    assert core.read_namespaced_pod("too-big", namespace).status.phase == "Pending"


def test_secrets_reach_the_process_and_rbac_is_enforced(
    core: client.CoreV1Api, cluster: ClusterInfo, namespace: str
) -> None:
    value = "canary-" + unique_name("s")
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"key": value}})
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "limited"}})
    code = """
        import hashlib, os
        from kubernetes import client, config
        env = os.environ['PERSIST_KEY']
        mounted = open('/etc/creds/key').read()
        print('env', hashlib.sha256(env.encode()).hexdigest())
        print('file', hashlib.sha256(mounted.encode()).hexdigest())
        config.load_incluster_config()
        try:
            client.CoreV1Api().list_namespaced_secret(os.environ['NS'])
            print('secrets: allowed')
        except client.ApiException as exc:
            print('secrets:', exc.status)
    """
    env = [
        {"name": "PERSIST_KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    pod = python_pod(
        "reader",
        code,
        serviceAccountName="limited",
        # An emptyDir over /tmp must not hide the other volumes (the harness keeps them there).
        volumes=[{"name": "creds", "secret": {"secretName": "creds"}}, {"name": "tmp", "emptyDir": {}}],
        container={
            "env": env,
            "volumeMounts": [
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "creds", "mountPath": "/etc/creds"},
            ],
        },
    )
    core.create_namespaced_pod(namespace, pod)
    wait_for(lambda: phase_is(core, namespace, "reader", "Succeeded", "Failed"), 90, "the reader pod")
    log = pod_log(cluster.run_dir, namespace, "reader")
    digest = hashlib.sha256(value.encode()).hexdigest()
    assert f"env {digest}" in log
    assert f"file {digest}" in log
    assert "secrets: 403" in log
    assert value not in log


def test_pods_reach_each_other_over_pod_ips(
    core: client.CoreV1Api, cluster: ClusterInfo, namespace: str
) -> None:
    server = """
        import os, socket
        s = socket.socket(); s.bind((os.environ['POD_IP'], 8080)); s.listen()
        print('listening', flush=True)
        conn, addr = s.accept(); conn.sendall(b'hello from ' + os.environ['POD_IP'].encode()); conn.close()
    """
    pod_ip_env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    core.create_namespaced_pod(namespace, python_pod("server", server, container={"env": pod_ip_env}))
    wait_for(
        lambda: "listening" in pod_log(cluster.run_dir, namespace, "server"), 120, "the server to listen"
    )
    server_ip = core.read_namespaced_pod("server", namespace).status.pod_ip
    client_code = f"""
        import socket
        s = socket.create_connection(('{server_ip}', 8080), timeout=10)
        print('received', s.recv(100).decode())
    """
    core.create_namespaced_pod(namespace, python_pod("client", client_code))
    wait_for(
        lambda: phase_is(core, namespace, "client", "Succeeded"),
        120,
        "the client to finish",
        describe=lambda: pod_log(cluster.run_dir, namespace, "client"),
    )
    client_ip = core.read_namespaced_pod("client", namespace).status.pod_ip
    assert client_ip != server_ip
    assert f"received hello from {server_ip}" in pod_log(cluster.run_dir, namespace, "client")


def test_s3_multipart_upload_round_trips(cluster: ClusterInfo, tmp_path: Path) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=cluster.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=cluster.s3_access_key,
        aws_secret_access_key=cluster.s3_secret_key,
    )
    bucket = unique_name("bucket")
    s3.create_bucket(Bucket=bucket)
    payload = hashlib.sha256(b"seed").digest() * (12 * 1024 * 1024 // 32)
    (tmp_path / "in.bin").write_bytes(payload)
    config = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    s3.upload_file(str(tmp_path / "in.bin"), bucket, "ckpt/in.bin", Config=config)
    head = s3.head_object(Bucket=bucket, Key="ckpt/in.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: a real multipart upload
    s3.download_file(bucket, "ckpt/in.bin", str(tmp_path / "out.bin"))
    assert (tmp_path / "out.bin").read_bytes() == payload


def test_prometheus_scrapes_a_pod_metrics_port(
    core: client.CoreV1Api, cluster: ClusterInfo, namespace: str
) -> None:
    code = """
        import os, time
        from prometheus_client import Gauge, start_http_server
        Gauge('localcluster_probe_value', 'probe').set(42)
        start_http_server(9400, addr=os.environ['POD_IP'])
        time.sleep(300)
    """
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    ports = [{"name": "metrics", "containerPort": 9400}]
    core.create_namespaced_pod(
        namespace, python_pod("exporter", code, container={"env": env, "ports": ports})
    )
    query = urllib.parse.urlencode({"query": f'localcluster_probe_value{{namespace="{namespace}"}}'})

    def sample() -> list[Any]:
        with urllib.request.urlopen(f"{cluster.prometheus_url}/api/v1/query?{query}", timeout=5) as response:
            return list(json.load(response)["data"]["result"])

    result = wait_for(sample, 120, "Prometheus to scrape the pod")
    assert result[0]["value"][1] == "42"
    assert result[0]["metric"]["pod"] == "exporter"
