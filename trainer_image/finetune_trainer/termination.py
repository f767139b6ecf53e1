"""SIGTERM, Kubernetes' notice that the pod's grace period has begun, as the trainer sees it.

From the first line of `main` (`stop_on_sigterm`), SIGTERM ends the current phase at once: data
preparation, downloads, restore, baseline and final evaluation have nothing new to checkpoint, and
raising `Terminated` lets the run exit 76 well within the grace period. Where stopping at once would
lose work, `deferred()` only records the request: training stops at the next step boundary and
saves a checkpoint (`callbacks.PreemptionCallback`), then exits 75. Everything after the run, such
as keeping /metrics up for a last scrape (`catch_sigterm`), must not spend the grace period either.

A phase stuck in native code (a download, a tokenizer batch) runs no Python signal handler until it
returns, so a watchdog thread, woken by the signal itself, ends the process after STOP_DEADLINE_S.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from finetune_trainer.exitcodes import ExitCode

log = logging.getLogger(__name__)
STOP_DEADLINE_S = 10.0  # well inside the 30 s minimum grace period the operator allows
_requested = False
_deferring = False


class Terminated(BaseException):
    """SIGTERM outside training. A BaseException, so that `except Exception` in a phase lets it through."""


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread, except inside `deferred()`."""
    global _deferring
    _deferring = False
    signal.signal(signal.SIGTERM, _on_sigterm)
    _start_watchdog()


def catch_sigterm() -> None:
    """From now on SIGTERM only records the request; the code that runs checks `requested()`."""
    global _deferring
    _deferring = True
    signal.signal(signal.SIGTERM, _on_sigterm)


@contextmanager
def deferred() -> Iterator[None]:
    """Inside, SIGTERM is only recorded: the code stops at its own safe point (training's checkpoint)."""
    global _deferring
    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    previous, _deferring = _deferring, True
    try:
        yield
    finally:
        _deferring = previous
        signal.signal(signal.SIGTERM, previous_handler)


def requested() -> bool:
    return _requested


def stop_if_requested() -> None:
    """A SIGTERM recorded inside `deferred()` that its code did not act on stops the run now."""
    if _requested:
        raise Terminated


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _requested
    first, _requested = not _requested, True
    if not first:
        return  # the first one is being handled; a second must not interrupt the clean-up
    if _deferring:
        log.warning("SIGTERM received: stopping at the next safe point (in training: after a checkpoint)")
        return
    log.warning("SIGTERM received outside training: stopping now, nothing new to checkpoint")
    raise Terminated


def _start_watchdog() -> None:
    """The signal's own wake-up byte reaches this thread even while the main thread is in native code."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), name="sigterm-watchdog", daemon=True).start()


def _watch(read_fd: int) -> None:
    while signal.SIGTERM not in os.read(read_fd, 64) or _deferring:
        pass
    time.sleep(STOP_DEADLINE_S)
    if _deferring:
        return  # training took over meanwhile: it saves a checkpoint and exits itself
    code = ExitCode.PREEMPTED_OUTSIDE_TRAINING
    log.error("still running %gs after SIGTERM: exiting now with code %d", STOP_DEADLINE_S, code)
    os._exit(code)
