"""One event-loop thread for the worker's command I/O (pipes, ptys, exits, timers).

Why: a thread per pipe and per exit (three per command, plus a supervisor) cost a
scheduler round trip each on a loaded machine and a stack each while a command runs.
Here one daemon thread, blocked in a ``selectors.DefaultSelector`` (epoll), serves every
command of the worker:

- ``add_reader(fd, callback)`` calls ``callback()`` on the loop thread while ``fd`` is
  readable; the returned ``Reader`` can be paused and resumed (output backpressure: a
  paused pipe is not drained, so the command's writes block) and removed;
- ``watch_exit(proc, callback)`` calls ``callback(returncode)`` on the loop once the child
  has exited and been reaped. The exit is seen through ``os.pidfd_open(pid)`` (readable
  when the child exits), then reaped with ``proc.poll()`` (waitpid WNOHANG). Only where
  ``pidfd_open`` raises (``AttributeError``: no such call here; ``OSError``: a kernel before
  5.3, or a sandbox that forbids it) does a thread of its own block in ``proc.wait()``;
- ``call_soon`` (thread-safe, wakes the loop through a self-pipe) and ``call_later``
  (timers: a terminal's drain deadline, command timeouts).

Callbacks run on the loop thread and must not block: whatever blocks (stopping a
command, waiting for a broker) is handed to another thread. A callback that raises is
logged; the loop goes on.

The thread starts on first use and ends when nothing is registered (no reader, no timer,
no queued call) and either nobody ``hold()``s the loop or it has been idle for
``idle_s``; the next use starts it again. An executor holds the loop from its creation
to its ``close()``, so consecutive commands reuse one thread, and a closed worker leaves
none behind. ``shared()`` is the worker process's one loop.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import selectors
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

IDLE_S = 30.0
#: When a pidfd is readable but the child is not reapable yet (another thread holds
#: Popen's wait lock), look again after this long rather than spin on the pidfd.
REAP_RETRY_S = 0.01


class Timer:
    """A ``call_later`` entry; ``cancel()`` from any thread (a no-op once it ran)."""

    __slots__ = ("_loop", "args", "callback", "cancelled", "when")

    def __init__(self, loop: IoLoop, when: float, callback: Callable[..., Any],
                 args: tuple[Any, ...]) -> None:
        self._loop = loop
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self._loop._cancel(self)


class Reader:
    """An fd the loop reads from (see ``IoLoop.add_reader``). Every method is thread-safe:
    off the loop thread it takes effect on the loop's next turn."""

    def __init__(self, loop: IoLoop, fd: int, callback: Callable[[], None]) -> None:
        self.loop = loop
        self.fd = fd
        self.callback = callback
        self.paused = False
        self.removed = False
        self._registered = False

    def pause(self) -> None:
        """Stop reading until ``resume()`` (the fd is left alone meanwhile)."""
        self.loop.run_on_loop(self._set_paused, True)

    def resume(self) -> None:
        self.loop.run_on_loop(self._set_paused, False)

    def remove(self) -> None:
        """Never read again (the caller closes the fd, after this on the loop thread)."""
        self.loop.run_on_loop(self._remove)

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        self._sync()

    def _remove(self) -> None:
        if not self.removed:
            self.removed = True
            self._sync()
            self.loop._forget(self)

    def _sync(self) -> None:
        """Register the fd with the selector exactly while it is to be read."""
        want = not self.paused and not self.removed
        selector = self.loop._selector
        if want and not self._registered:
            selector.register(self.fd, selectors.EVENT_READ, self)
            self._registered = True
        elif not want and self._registered:
            with contextlib.suppress(KeyError, ValueError, OSError):
                selector.unregister(self.fd)
            self._registered = False


class IoLoop:
    """See the module docstring."""

    def __init__(self, name: str = "io-loop", *, idle_s: float = IDLE_S) -> None:
        self.name = name
        self.idle_s = idle_s
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._live_timers = 0
        self._order = itertools.count()
        self._readers: set[Reader] = set()
        self._holders = 0
        self._woken = False
        self._thread: threading.Thread | None = None
        self._started = 0

    # -- any thread ----------------------------------------------------------------------

    def in_loop(self) -> bool:
        """Is the caller the loop thread?"""
        return self._thread is threading.current_thread()

    @property
    def thread(self) -> threading.Thread | None:
        """The loop thread while it runs."""
        return self._thread

    def hold(self) -> None:
        """Keep the thread (idle up to ``idle_s``) until the matching ``release()``."""
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        """Undo one ``hold()``: with no holder left, the thread ends once nothing is
        registered."""
        with self._lock:
            self._holders = max(0, self._holders - 1)
            self._wake_locked()

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop thread, in call order."""
        with self._lock:
            self._calls.append((callback, args))
            self._wake_locked()

    def run_on_loop(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run it now when called on the loop thread, else ``call_soon``."""
        if self.in_loop():
            callback(*args)
        else:
            self.call_soon(callback, *args)

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` on the loop thread in ``delay`` seconds."""
        timer = Timer(self, time.monotonic() + max(0.0, delay), callback, args)
        with self._lock:
            heapq.heappush(self._timers, (timer.when, next(self._order), timer))
            self._live_timers += 1
            self._wake_locked()
        return timer

    def add_reader(self, fd: int, callback: Callable[[], None]) -> Reader:
        """Call ``callback()`` on the loop thread whenever ``fd`` is readable (until the
        reader is paused or removed). ``fd`` should be non-blocking."""
        reader = Reader(self, fd, callback)
        with self._lock:
            self._readers.add(reader)
        self.run_on_loop(reader._sync)
        return reader

    def watch_exit(self, proc: subprocess.Popen[bytes],
                   callback: Callable[[int], None]) -> None:
        """Call ``callback(returncode)`` on the loop thread once ``proc`` has exited (it is
        reaped here: nobody else may wait for it meanwhile)."""
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (OSError, AttributeError) as err:  # no pidfd here: a thread per exit
            log.debug("pidfd_open(%d) failed (%s): watching the exit from a thread",
                      proc.pid, err)
            threading.Thread(target=self._wait_thread, args=(proc, callback), daemon=True,
                             name=f"{self.name}-wait-{proc.pid}").start()
            return
        os.set_inheritable(pidfd, False)
        holder: list[Reader] = []

        def exited() -> None:
            returncode = proc.poll()
            reader = holder[0]
            if returncode is None:  # not reapable yet (a concurrent poll): look again
                reader.pause()
                self.call_later(REAP_RETRY_S, reader.resume)
                return
            reader.remove()
            os.close(pidfd)
            callback(returncode)

        holder.append(self.add_reader(pidfd, exited))

    # -- internals -----------------------------------------------------------------------

    def _wait_thread(self, proc: subprocess.Popen[bytes],
                     callback: Callable[[int], None]) -> None:
        self.call_soon(callback, proc.wait())

    def _wake_locked(self) -> None:
        """Make sure a loop thread runs and will look at the queue (lock held)."""
        if self._thread is None:
            self._started += 1
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"{self.name}-{self._started}")
            # Not marked woken: the new thread may be about to wait for a timer, and
            # what is added meanwhile must wake it (it then slept through a call added
            # during its first wait: until the timer's due time)
            self._woken = False
            self._thread.start()
            return
        if not self._woken:
            self._woken = True
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")

    def _cancel(self, timer: Timer) -> None:
        with self._lock:
            if not timer.cancelled:
                timer.cancelled = True
                self._live_timers -= 1
                self._wake_locked()  # lets an otherwise empty loop end

    def _forget(self, reader: Reader) -> None:
        with self._lock:
            self._readers.discard(reader)

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._lock:
                busy = bool(self._calls or self._readers or self._live_timers)
                if busy:
                    idle_since = time.monotonic()
                elif not self._holders or time.monotonic() - idle_since >= self.idle_s:
                    self._thread = None  # the next use starts another
                    self._woken = False
                    return
                timeout = self._timeout_locked(busy, idle_since)
            for key, _mask in self._selector.select(timeout):
                reader = key.data
                if reader is None:
                    self._drain_wake()
                elif isinstance(reader, Reader) and not reader.removed and not reader.paused:
                    self._guard(reader.callback, ())
            self._run_timers()
            self._run_calls()

    def _timeout_locked(self, busy: bool, idle_since: float) -> float | None:
        if self._calls:
            return 0.0
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            return max(0.0, self._timers[0][0] - time.monotonic())
        if not busy:
            return max(0.0, idle_since + self.idle_s - time.monotonic())
        return None

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _run_timers(self) -> None:
        now = time.monotonic()
        due: list[Timer] = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                timer = heapq.heappop(self._timers)[2]
                if not timer.cancelled:
                    timer.cancelled = True  # ran: a later cancel() is a no-op
                    self._live_timers -= 1
                    due.append(timer)
        for timer in due:
            self._guard(timer.callback, timer.args)

    def _run_calls(self) -> None:
        with self._lock:
            self._woken = False
            calls, self._calls = self._calls, deque()
        for callback, args in calls:
            self._guard(callback, args)

    @staticmethod
    def _guard(callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            callback(*args)
        except Exception:  # one command's failure must not end every command's I/O
            log.exception("I/O loop callback %r failed", callback)


_shared: IoLoop | None = None
_shared_lock = threading.Lock()


def shared() -> IoLoop:
    """The worker process's I/O loop (made on first use; its thread starts lazily)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = IoLoop("exec-io")
        return _shared
