"""localcluster up|down|status|env|logs: run the local cluster from a shell."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from localcluster.cluster import ClusterInfo, ClusterOptions, LocalCluster, stop_run
from localcluster.processes import ComponentError
from localcluster.tools import REPO_ROOT, MissingToolError

DEFAULT_RUN_DIR = REPO_ROOT / ".run" / "localcluster"


def _info(run_dir: Path) -> ClusterInfo | None:
    try:
        return ClusterInfo.load(run_dir)
    except FileNotFoundError:
        return None


def up(args: argparse.Namespace) -> int:
    if _info(args.run_dir):
        print(f"a cluster already runs in {args.run_dir}; `localcluster down` first", file=sys.stderr)
        return 1
    options = ClusterOptions(run_dir=args.run_dir, gpus=args.gpus, gpu_memory_gib=args.gpu_memory_gib)
    cluster = LocalCluster(options)
    try:
        info = cluster.start()
    except (MissingToolError, ComponentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"cluster up in {args.run_dir}")
    print(f"  kubeconfig: {info.kubeconfig}")
    print(f"  S3:         {info.s3_endpoint}")
    print(f"  Prometheus: {info.prometheus_url}")
    print(f"use it:  eval $(python -m localcluster env --run-dir {args.run_dir})")
    return 0


def down(args: argparse.Namespace) -> int:
    if stop_run(args.run_dir):
        print(f"stopped the cluster in {args.run_dir}")
    else:
        print(f"no cluster runs in {args.run_dir}")
    return 0


def status(args: argparse.Namespace) -> int:
    info = _info(args.run_dir)
    if info is None:
        print(f"no cluster runs in {args.run_dir}")
        return 1
    for name, pid in info.pids.items():
        alive = Path(f"/proc/{pid}").exists()
        print(f"{name:26} pid {pid:<8} {'running' if alive else 'DEAD'}")
    return 0


def env(args: argparse.Namespace) -> int:
    info = _info(args.run_dir)
    if info is None:
        print(f"no cluster runs in {args.run_dir}", file=sys.stderr)
        return 1
    for key, value in info.env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def logs(args: argparse.Namespace) -> int:
    """Prints a pod container's log (the agent keeps them; there is no kubelet log API)."""
    namespace, _, name = args.pod.rpartition("/")
    matches = sorted((args.run_dir / "pods").glob(f"{namespace or 'default'}_{name}_*/logs/*.log"))
    if args.container:
        matches = [m for m in matches if m.stem == args.container]
    if not matches:
        print(f"no logs for pod {args.pod} in {args.run_dir / 'pods'}", file=sys.stderr)
        return 1
    for path in matches:
        sys.stdout.write(path.read_text(errors="replace"))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="localcluster", description=__doc__)
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the cluster in the background")
    p_up.add_argument("--gpus", type=int, default=4, help="nvidia.com/gpu capacity of the node")
    p_up.add_argument("--gpu-memory-gib", type=int, default=80)
    p_up.set_defaults(func=up)
    sub.add_parser("down", help="stop the cluster and everything it started").set_defaults(func=down)
    sub.add_parser("status", help="show the components").set_defaults(func=status)
    sub.add_parser("env", help="print shell exports (KUBECONFIG, ...)").set_defaults(func=env)
    p_logs = sub.add_parser("logs", help="print a pod's container log: NAMESPACE/POD")
    p_logs.add_argument("pod")
    p_logs.add_argument("-c", "--container")
    p_logs.set_defaults(func=logs)
    args = parser.parse_args()
    args.run_dir = args.run_dir.resolve()
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
