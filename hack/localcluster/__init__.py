"""A local Kubernetes for tests and the quickstart: real etcd, kube-apiserver,
kube-controller-manager and kube-scheduler built from source, an S3-compatible server,
Prometheus, and a process node agent that runs pods as local processes.

Product packages never import this package."""

from localcluster.cluster import (
    ClusterInfo,
    ClusterOptions,
    LocalCluster,
    add_scrape_target,
    scrape_interval,
    stop_run,
)
from localcluster.tools import MissingToolError

__all__ = [
    "ClusterInfo",
    "ClusterOptions",
    "LocalCluster",
    "MissingToolError",
    "add_scrape_target",
    "scrape_interval",
    "stop_run",
]
