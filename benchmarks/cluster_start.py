"""Local cluster start time and idle memory.

Baseline, measured in the same run: etcd plus kube-apiserver alone (the smallest control plane a
test could use), so the ratio is the price of the rest (controllers, scheduler, node agent, S3,
Prometheus). Prints the machine and `ratio=<x> (full stack vs apiserver+etcd start)`.

    python benchmarks/cluster_start.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from machine import describe  # type: ignore[import-not-found]

from localcluster import ClusterOptions, LocalCluster
from localcluster.cluster import ClusterInfo
from localcluster.pki import create_pki
from localcluster.tools import check_all


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def start_full(root: Path) -> tuple[float, float]:
    cluster = LocalCluster(ClusterOptions(run_dir=root / "full"))
    started = time.monotonic()
    info: ClusterInfo = cluster.start()
    elapsed = time.monotonic() - started
    time.sleep(5)  # let the components settle before reading their memory
    memory = rss_mib(list(info.pids.values()))
    cluster.stop()
    return elapsed, memory


def start_minimal(root: Path) -> float:
    # The harness's own steps, without the rest of the stack.
    cluster = LocalCluster(ClusterOptions(run_dir=root / "minimal"))
    tools = check_all()
    cluster.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pki = create_pki(cluster.run_dir / "pki")
    etcd = cluster._start_etcd(tools["etcd"])
    cluster._start_apiserver(tools["kube-apiserver"], pki, etcd)
    elapsed = time.monotonic() - started
    cluster.stop()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    full, minimal, memory = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeat):
            root = Path(tmp) / str(round_)
            minimal.append(start_minimal(root))
            seconds, mib = start_full(root)
            full.append(seconds)
            memory.append(mib)
    print(describe())
    runs = ", ".join(f"{s:.1f}" for s in full)
    print(f"full stack ready: median {statistics.median(full):.1f}s (runs: {runs})")
    print(f"apiserver+etcd ready: median {statistics.median(minimal):.1f}s")
    print(f"idle memory of the full stack (RSS): median {statistics.median(memory):.0f} MiB")
    ratio = statistics.median(full) / statistics.median(minimal)
    print(f"ratio={ratio:.2f} (full stack vs apiserver+etcd start)")


if __name__ == "__main__":
    main()
