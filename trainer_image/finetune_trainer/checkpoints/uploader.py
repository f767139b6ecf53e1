"""One background worker per process: one checkpoint uploading at a time and at most one waiting.

A newer checkpoint replaces the one waiting (its local copy is dropped), so local disk holds at
most two checkpoints beyond what training keeps, and training never waits on the network.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Task:
    name: str
    run: Callable[[], None]
    discard: Callable[[], None] = lambda: None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    superseded: bool = False


class BackgroundUploader:
    def __init__(self, name: str = "checkpoint-upload") -> None:
        self._cond = threading.Condition()
        self._pending: Task | None = None
        self._running: Task | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, task: Task) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the checkpoint uploader is closed")
            replaced, self._pending = self._pending, task
            self._cond.notify_all()
        if replaced is not None:
            log.warning("checkpoint %s was not uploaded: %s is newer", replaced.name, task.name)
            replaced.superseded = True
            replaced.discard()
            replaced.done.set()

    def run_now(self, task: Task) -> None:
        """Run after whatever is uploading now; wait for it and raise its error."""
        self.submit(task)
        task.done.wait()
        if task.error is not None:
            raise task.error

    def wait(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending is None and self._running is None)

    def close(self) -> None:
        self.wait()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                task, self._pending, self._running = self._pending, None, self._pending
            try:
                task.run()
            except BaseException as exc:  # kept on the task; the submitter decides
                task.error = exc
            finally:
                task.done.set()
                with self._cond:
                    self._running = None
                    self._cond.notify_all()
