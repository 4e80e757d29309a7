"""Blocking work on reused threads, so that handing it over never waits for a thread.

``threading.Thread.start()`` returns only once the new thread has run; on a loaded
machine that is a scheduler round trip each time (measured: ~1.3 ms per start with one
busy core beside, three per command for its two pipes and its exit). The job runner
hands its attempts to a ``ThreadReuse`` instead
(the process executor's pipes and exits are on its I/O loop, worker/io_loop.py, and need
no thread at all): an idle thread takes the call at once, a new thread is made only
when none is idle, and a thread idle for ``idle_s`` ends. Calls that block for a task's
whole life are fine (each holds one thread; there is no cap to deadlock on).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

IDLE_S = 30.0

_Call = tuple[Callable[..., Any], tuple[Any, ...]]


class ThreadReuse:
    """See the module docstring. ``run(fn, *args)`` never blocks on another call."""

    def __init__(self, name: str, *, idle_s: float = IDLE_S) -> None:
        self.name = name
        self.idle_s = idle_s
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a call that no caller has claimed yet
        self._made = 0
        self._closed = False

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` on an idle thread, or on a new one if none is idle."""
        with self._lock:
            if self._idle > 0:
                self._idle -= 1  # claimed: the call below is for a waiting thread
                self._queue.put((fn, args))
                return
            self._made += 1
            number = self._made
        threading.Thread(target=self._loop, args=((fn, args),), daemon=True,
                         name=f"{self.name}-{number}").start()

    def close(self) -> None:
        """Idle threads end now, busy ones after their call (later calls still run, each
        on a thread of its own that ends with it)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._queue.put(None)

    @property
    def idle(self) -> int:
        with self._lock:
            return self._idle

    def _loop(self, call: _Call | None) -> None:
        while call is not None:
            self._call(call)
            call = None  # no reference to the finished call while waiting
            with self._lock:
                if self._closed:
                    return
                self._idle += 1
            call = self._next()

    def _call(self, call: _Call) -> None:
        fn, args = call
        try:
            fn(*args)
        except Exception:  # a call's own failure must not end the thread
            log.exception("%s: a call failed", self.name)

    def _next(self) -> _Call | None:
        while True:
            try:
                return self._queue.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    # Every claimed call is in the queue before its claim's lock is
                    # released: with the queue empty, this thread is unclaimed and may go.
                    if self._queue.empty():
                        self._idle = max(0, self._idle - 1)  # (0 after close)
                        return None
