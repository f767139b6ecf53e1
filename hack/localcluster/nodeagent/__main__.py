"""Entry point: python -m localcluster.nodeagent --kubeconfig ... --node-name ..."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from localcluster.nodeagent.agent import NodeAgent


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="localcluster.nodeagent", description=__doc__)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--node-name", default="local-node")
    parser.add_argument("--apiserver", required=True, help="https://host:port pods use to reach the API")
    parser.add_argument("--ca-cert", required=True)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--gpu-memory-gib", type=int, default=80)
    parser.add_argument("--cpus", type=int, default=16)
    parser.add_argument("--memory-gib", type=int, default=64)
    return parser.parse_args(argv)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    agent = NodeAgent(parse_args(sys.argv[1:]))
    agent.register()
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for target in (agent.heartbeat_forever, agent.watch_forever):
        threading.Thread(target=target, daemon=True).start()
    done.wait()
    agent.shutdown()


if __name__ == "__main__":
    main()
