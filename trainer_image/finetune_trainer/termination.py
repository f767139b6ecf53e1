"""SIGTERM, Kubernetes' notice that the pod's grace period has begun, as the trainer sees it.

Training stops at the next step boundary and saves a checkpoint (`callbacks.PreemptionCallback`);
everything after it, such as keeping /metrics up for a last scrape, must not spend the grace period.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

log = logging.getLogger(__name__)
_requested = False


def catch_sigterm() -> None:
    """From now on SIGTERM only records the request; the code that runs checks `requested()`."""
    signal.signal(signal.SIGTERM, _record)


def requested() -> bool:
    return _requested


def _record(signum: int, frame: FrameType | None) -> None:
    global _requested
    if not _requested:
        log.warning("SIGTERM received: stopping (training saves a checkpoint first)")
    _requested = True
