"""Operator at scale: N FineTuneJobs created at once on a local control plane, timed until every
batch/v1 Job exists, against creating the same N Jobs directly with the Kubernetes client (the
floor: what the API server and the client cost without the operator). Starts its own local
cluster (no Prometheus, no S3) and `python -m finetune_operator`; jobs are suspended, so no pod runs.

    python benchmarks/operator_scale.py [--jobs 200] [--workers 8]
    python benchmarks/operator_scale.py --finished 2000 [--running 20] [--window 60]

The second form is the fleet case: many finished jobs and a few running ones, measured in the
operator's steady state (API requests per refresh pass, peak RSS).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kubernetes import client, config, watch
from machine import describe
from urllib3.exceptions import ProtocolError

from finetune_operator import api, builders, policy
from finetune_operator.settings import OperatorSettings
from localcluster import ClusterInfo, ClusterOptions, LocalCluster
from localcluster.operators import start_operator
from localcluster.testing import wait_for
from localcluster.tools import REPO_ROOT, tool

CRD_FILE = REPO_ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
SETTINGS_ENV = {"FINETUNE_OPERATOR_ENVIRONMENT": "onprem", "FINETUNE_OPERATOR_GPU_MEMORY_GIB": "80"}


def job_spec() -> dict[str, Any]:
    return {
        "goal": {
            "task": "answer support tickets",
            "metrics": ["exact_match"],
            "successCriteria": [{"metric": "eval_loss", "maxRegression": 0.0}],
        },
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B", "parameters": "0.5B"},
        "dataset": {"source": "s3://data/tickets.jsonl", "format": "alpaca"},
        "method": {"type": "lora"},
        "checkpoints": {"store": {"bucket": "ckpt", "credentialsSecret": "s3-creds"}},
        "suspend": True,
    }


def memory_line() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"memory: {int(line.split()[1]) / 1024**2:.1f} GiB"
    return "memory: unknown"


def peak_rss_mib(pid: int, field: str = "VmHWM") -> float:
    """VmHWM: the kernel's record of the process's largest resident set so far (VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class JobArrivals:
    """When each batch/v1 Job of a namespace first appeared, from a watch started beforehand."""

    def __init__(self, kube: client.ApiClient, namespace: str) -> None:
        batch = client.BatchV1Api(kube)
        version = batch.list_namespaced_job(namespace).metadata.resource_version
        self.seen: dict[str, float] = {}
        self._watch = watch.Watch()

        def run() -> None:
            with contextlib.suppress(ProtocolError):  # the end of a stopped stream
                for event in self._watch.stream(
                    batch.list_namespaced_job, namespace, resource_version=version, timeout_seconds=3600
                ):
                    if isinstance(event, dict) and event.get("object") is not None:
                        self.seen.setdefault(event["object"].metadata.name, time.monotonic())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def wait_all(self, names: list[str], timeout: float) -> None:
        wait_for(
            lambda: all(n in self.seen for n in names),
            timeout,
            f"{len(names)} Jobs",
            interval=0.05,
            describe=lambda: f"{len(self.seen)} of {len(names)}",
        )
        self._watch.stop()


@dataclass(frozen=True)
class Timing:
    total: float
    latencies: list[float]

    def describe(self) -> str:
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        return f"total {self.total:.2f} s, per job p50 {statistics.median(ordered):.2f} s, p99 {p99:.2f} s"


def timed_creation(
    kube: client.ApiClient, namespace: str, names: list[str], create: Callable[[str], None], workers: int
) -> Timing:
    """Submits every create at once (a pool of `workers` clients) and waits for every Job."""
    arrivals = JobArrivals(kube, namespace)
    submitted: dict[str, float] = {}
    start = time.monotonic()

    def submit(name: str) -> None:
        submitted[name] = time.monotonic()
        create(name)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(submit, names))
    arrivals.wait_all(names, timeout=1800)
    return Timing(
        total=max(arrivals.seen[n] for n in names) - start,
        latencies=[arrivals.seen[n] - submitted[n] for n in names],
    )


def install_crd(info: ClusterInfo, kube: client.ApiClient) -> None:
    subprocess.run(
        [
            str(tool("kubectl")),
            "--kubeconfig",
            info.kubeconfig,
            "apply",
            "--server-side",
            "-f",
            str(CRD_FILE),
        ],
        check=True,
        capture_output=True,
    )
    ext = client.ApiextensionsV1Api(kube)

    def established() -> bool:
        conditions = ext.read_custom_resource_definition("finetunejobs.finetune.dev").status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_for(established, 30, "the CRD to be Established")


@contextlib.contextmanager
def running_operator(info: ClusterInfo, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The operator as the chart runs it: holding the leader Lease, so its cost is measured too."""
    env = {
        **SETTINGS_ENV,
        "FINETUNE_OPERATOR_METRICS_PORT": "0",
        "FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE": "default",
    }
    running = start_operator(info, log, env, pdeathsig="TERM")
    try:
        yield running.process
    finally:
        running.stop()


def namespace_with_secret(core: client.CoreV1Api, name: str) -> None:
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: core.read_namespaced_service_account("default", name), 30, f"default SA in {name}")
    secret = {"accessKeyId": "bench", "secretAccessKey": "bench-not-a-secret"}
    core.create_namespaced_secret(name, {"metadata": {"name": "s3-creds"}, "stringData": secret})


def direct_job(namespace: str, name: str) -> dict[str, Any]:
    """The Job the operator would create for `job_spec()`, less the owner reference (the garbage
    collector would delete a Job whose owner does not exist)."""
    settings = OperatorSettings(environment=api.Environment.ONPREM, gpu_memory_gib=80)
    ref = builders.JobRef(name=name, namespace=namespace, uid=f"direct-{name}")
    spec = api.parse_spec(job_spec())
    decision = policy.resolve_method(spec, settings)
    manifest = builders.build_training_job(
        ref, spec, decision, settings, is_cloud=False, config_hash="direct"
    )
    del manifest["metadata"]["ownerReferences"]
    return manifest


def apiserver_requests(info: ClusterInfo) -> dict[str, float]:
    """The API server's own count of the requests it served, by verb (all clients: the operator,
    and the controllers, whose share is small for suspended Jobs)."""
    raw = subprocess.run(
        [str(tool("kubectl")), "--kubeconfig", info.kubeconfig, "get", "--raw", "/metrics"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    counts: dict[str, float] = {}
    for line in raw.splitlines():
        if line.startswith("apiserver_request_total{"):
            labels, value = line.rsplit(" ", 1)
            verb = labels.split('verb="', 1)[1].split('"', 1)[0]
            counts[verb] = counts.get(verb, 0.0) + float(value)
    return counts


def per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> str:
    verbs = {v: (after.get(v, 0.0) - before.get(v, 0.0)) / jobs for v in sorted(after)}
    shown = ", ".join(f"{v} {n:.1f}" for v, n in verbs.items() if n >= 0.05)
    return f"{sum(verbs.values()):.1f} API requests per job ({shown})"


def ftj_body(name: str) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": job_spec()}


def fleet(
    info: ClusterInfo, kube: client.ApiClient, tmp: Path, finished: int, running: int, window: float
) -> None:
    """`finished` FineTuneJobs that have ended (status Succeeded, their Jobs gone) and `running`
    ones: the API requests of the operator's steady state, per refresh pass, and its peak RSS."""
    core, custom = client.CoreV1Api(kube), client.CustomObjectsApi(kube)
    namespace_with_secret(core, "bench-fleet")
    done = {"phase": "Succeeded", "completionTime": "2026-12-01T00:00:00Z", "observedGeneration": 1}

    def create_finished(name: str) -> None:
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, "bench-fleet", api.PLURAL, ftj_body(name)
        )
        custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, "bench-fleet", api.PLURAL, name, {"status": done}
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create_finished, [f"done-{i:05d}" for i in range(finished)]))
    with running_operator(info, tmp / "fleet-operator.log") as operator:
        live = [f"live-{i:03d}" for i in range(running)]
        timed_creation(kube, "bench-fleet", live, lambda n: create_live(custom, n), 8)
        time.sleep(20)  # the start-up pass over every job (resume handlers) settles
        before = apiserver_requests(info)
        time.sleep(window)
        after = apiserver_requests(info)
        rss, now = peak_rss_mib(operator.pid), peak_rss_mib(operator.pid, "VmRSS")
    passes = window / REFRESH_INTERVAL_S
    total = sum(after.values()) - sum(before.values())
    print(f"fleet: {finished} finished + {running} running FineTuneJobs, {window:.0f} s of steady state")
    print(f"       {total / passes:.1f} API requests per refresh pass ({total / window:.1f}/s, all clients)")
    print(f"       operator RSS {now:.0f} MiB in the steady state, peak {rss:.0f} MiB (start-up)")


REFRESH_INTERVAL_S = 15.0


def create_live(custom: client.CustomObjectsApi, name: str) -> None:
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, "bench-fleet", api.PLURAL, ftj_body(name))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200, help="FineTuneJobs (and direct Jobs) to create")
    parser.add_argument("--workers", type=int, default=8, help="concurrent clients submitting them")
    parser.add_argument("--finished", type=int, default=0, help="the fleet case: finished FineTuneJobs")
    parser.add_argument("--running", type=int, default=20, help="the fleet case: running ones")
    parser.add_argument("--window", type=float, default=60.0, help="the fleet case: seconds measured")
    args = parser.parse_args()
    if args.finished:
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            options = ClusterOptions(run_dir=Path(tmp) / "cluster", with_prometheus=False, with_s3=False)
            with LocalCluster(options) as info:
                kube = config.new_client_from_config(info.kubeconfig)
                install_crd(info, kube)
                print(describe())
                fleet(info, kube, Path(tmp), args.finished, args.running, args.window)
        return
    names = [f"bench-{i:04d}" for i in range(args.jobs)]
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        options = ClusterOptions(run_dir=Path(tmp) / "cluster", with_prometheus=False, with_s3=False)
        with LocalCluster(options) as info:
            kube = config.new_client_from_config(info.kubeconfig)
            core = client.CoreV1Api(kube)
            install_crd(info, kube)
            namespace_with_secret(core, "bench-operator")
            namespace_with_secret(core, "bench-direct")
            custom = client.CustomObjectsApi(kube)

            def create_ftj(name: str) -> None:
                custom.create_namespaced_custom_object(
                    api.GROUP, api.VERSION, "bench-operator", api.PLURAL, ftj_body(name)
                )

            with running_operator(info, Path(tmp) / "operator.log") as operator:
                before = apiserver_requests(info)
                ours = timed_creation(kube, "bench-operator", names, create_ftj, args.workers)
                ours_requests = per_job(before, apiserver_requests(info), args.jobs)
                rss = peak_rss_mib(operator.pid)

            batch = client.BatchV1Api(kube)
            before = apiserver_requests(info)
            floor = timed_creation(
                kube,
                "bench-direct",
                names,
                lambda name: batch.create_namespaced_job("bench-direct", direct_job("bench-direct", name)),
                args.workers,
            )
            floor_requests = per_job(before, apiserver_requests(info), args.jobs)
    print(describe())
    print(memory_line())
    print(f"jobs={args.jobs}, submitted by {args.workers} concurrent clients, suspended (no pods)")
    print(f"operator: {ours.describe()}, operator peak RSS {rss:.0f} MiB")
    print(f"          {ours_requests}")
    print(f"direct:   {floor.describe()}")
    print(f"          {floor_requests}")
    print(f"ratio={ours.total / floor.total:.2f} (operator vs direct Job creation, {args.jobs} jobs)")


if __name__ == "__main__":
    main()
