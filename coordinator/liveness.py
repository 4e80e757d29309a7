"""HeartbeatMonitor: notices workers whose heartbeats stopped.

One heap entry per tracked worker, keyed by its deadline (last heard + k intervals).
A heartbeat only updates ``last_seen`` in a dict (O(1), called at ingest rate); when an
entry reaches the top of the heap and the worker was heard since, it is pushed back
with its new deadline. So detection is exact to the deadline, and 5,000 workers cost
a few hundred heap operations a second, not one per heartbeat.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

LostCallback = Callable[[str, float], None]


class HeartbeatMonitor:
    """Calls ``on_lost(wid, silent_for_s)`` once a tracked worker misses its deadline."""

    def __init__(
        self, factor: float, on_lost: LostCallback, clock: Callable[[], float] = time.time
    ) -> None:
        self.factor = factor
        self._on_lost = on_lost
        self._clock = clock
        self._last: dict[str, tuple[float, float]] = {}  # wid -> (last_seen, interval)
        self._heap: list[tuple[float, str]] = []
        self._queued: set[str] = set()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeat-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(5)

    def track(self, wid: str, last_seen: float, interval: float) -> None:
        """Start (or keep) watching ``wid``; called on join, status online and restart."""
        with self._cond:
            self._last[wid] = (last_seen, interval)
            if wid not in self._queued:
                self._queued.add(wid)
                heapq.heappush(self._heap, (last_seen + self.factor * interval, wid))
                self._cond.notify()

    def beat(self, wid: str, now: float, interval: float) -> None:
        """Record a heartbeat. Cheap: no heap work unless the worker was untracked."""
        entry = self._last.get(wid)
        if entry is None:
            return
        self._last[wid] = (now, interval)
        if interval < entry[1]:
            # A shorter interval than the heap entry was pushed with: its deadline is
            # now earlier than the one queued, so queue the earlier one too.
            with self._cond:
                heapq.heappush(self._heap, (now + self.factor * interval, wid))
                self._queued.add(wid)
                self._cond.notify()

    def refresh_all(self, now: float) -> None:
        """Give every tracked worker a full deadline from ``now`` (we were deaf)."""
        with self._cond:
            for wid, (_, interval) in list(self._last.items()):
                self._last[wid] = (now, interval)

    def forget(self, wid: str) -> None:
        """Stop watching ``wid`` (it went offline or was found lost)."""
        with self._cond:
            self._last.pop(wid, None)

    def tracked(self) -> int:
        return len(self._last)

    def _run(self) -> None:
        while True:
            expired: list[tuple[str, float]] = []
            with self._cond:
                if self._stop:
                    return
                now = self._clock()
                while self._heap and self._heap[0][0] <= now:
                    _, wid = heapq.heappop(self._heap)
                    entry = self._last.get(wid)
                    if entry is None:
                        self._queued.discard(wid)
                        continue
                    last_seen, interval = entry
                    deadline = last_seen + self.factor * interval
                    if deadline > now:
                        heapq.heappush(self._heap, (deadline, wid))
                        continue
                    self._queued.discard(wid)
                    del self._last[wid]
                    expired.append((wid, now - last_seen))
                timeout = (self._heap[0][0] - now) if self._heap else 1.0
                if not expired:
                    self._cond.wait(max(0.005, min(timeout, 1.0)))
            for wid, silent in expired:
                try:
                    self._on_lost(wid, silent)
                except Exception:
                    log.exception("lost-worker handling failed for %s", wid)
