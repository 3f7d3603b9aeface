"""A bounded background writer: store writes overlap with the next batch's compute.

:class:`BackgroundWriter` runs submitted jobs (one store ``put`` each) in order on one
thread. What is queued, counting the job being written, never exceeds ``max_bytes``
(the features a job holds, as the submitter declares them): :meth:`BackgroundWriter.submit`
blocks until the writer has made room, so a slow disk slows the extraction down instead
of filling memory. A single job larger than ``max_bytes`` is let in alone.

Each job's outcome (its return value or the exception it raised) comes back, in
submission order, from :meth:`BackgroundWriter.results` on the caller's thread, which
decides what an exception means (the extraction reports store errors per image and
re-raises anything else). ``max_bytes = 0`` runs each job at once on the caller's thread.

Crash safety is the store's: an entry reads as complete only once its completion marker
is written (see docs/store-format.md), so a process killed with jobs queued or half
written leaves no entry that reads as complete; the next run computes those images again.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

__all__ = ["BackgroundWriter", "WriteResult"]


@dataclass
class WriteResult:
    """The outcome of one job: ``value`` (what it returned) or ``error`` (what it raised)."""

    tag: Hashable
    value: Any = None
    error: BaseException | None = None


class BackgroundWriter:
    """Runs write jobs on one background thread, holding at most ``max_bytes`` queued.

    Use as a context manager, or call :meth:`close` (waits for every job) or
    :meth:`abort` (drops the jobs not yet started, waits for the running one).
    """

    def __init__(self, max_bytes: int, *, name: str = "diffeat-writer") -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        #: the most bytes ever queued at once (including the job being written)
        self.peak_bytes = 0
        self._name = name
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Hashable, int, Callable[[], Any]]] = deque()
        self._queued_bytes = 0
        self._done: deque[WriteResult] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def queued_bytes(self) -> int:
        """Bytes queued now, including the job being written."""
        with self._cond:
            return self._queued_bytes

    def submit(self, tag: Hashable, nbytes: int, job: Callable[[], Any]) -> None:
        """Queue ``job`` (holding ``nbytes``); blocks while it would not fit under ``max_bytes``."""
        if self.max_bytes == 0:
            self._done.append(self._run(tag, job))
            return
        with self._cond:
            if self._closing:
                raise RuntimeError("the background writer is closed")
            while self._jobs and self._queued_bytes + nbytes > self.max_bytes:
                self._cond.wait()
            self._jobs.append((tag, nbytes, job))
            self._queued_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self._queued_bytes)
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

    def results(self) -> list[WriteResult]:
        """The outcomes of the jobs finished since the last call, in submission order."""
        with self._cond:
            out = list(self._done)
            self._done.clear()
        return out

    def close(self) -> list[WriteResult]:
        """Wait for every queued job; return the outcomes not yet taken by :meth:`results`."""
        self._stop(drop=False)
        return self.results()

    def abort(self) -> None:
        """Drop the jobs not yet started and wait for the one being written."""
        self._stop(drop=True)

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._stop(drop=False)
        else:
            self._stop(drop=True)

    # -- the thread ------------------------------------------------------------------------

    @staticmethod
    def _run(tag: Hashable, job: Callable[[], Any]) -> WriteResult:
        try:
            return WriteResult(tag, value=job())
        except BaseException as exc:  # handed to the caller's thread, which decides
            return WriteResult(tag, error=exc)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:
                    return
                tag, nbytes, job = self._jobs[0]  # still counted while it is written
            result = self._run(tag, job)
            with self._cond:
                if self._jobs and self._jobs[0][0] == tag:
                    self._jobs.popleft()
                    self._queued_bytes -= nbytes
                self._done.append(result)
                self._cond.notify_all()

    def _stop(self, *, drop: bool) -> None:
        with self._cond:
            self._closing = True
            if drop and self._jobs:
                running = self._jobs[0] if self._thread is not None else None
                self._jobs.clear()
                self._queued_bytes = 0
                if running is not None:  # the job being written stays until it ends
                    self._jobs.append(running)
                    self._queued_bytes = running[1]
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
