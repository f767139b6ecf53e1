"""The machine line every benchmark prints."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> str:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"machine: {platform.node()} {platform.machine()} {model or platform.processor()}, "
        f"{cpus} CPUs, Python {platform.python_version()}"
    )
