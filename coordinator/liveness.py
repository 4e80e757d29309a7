"""HeartbeatMonitor: notices workers whose heartbeats stopped, and confirms last wills.

One heap entry per tracked worker, keyed by its deadline (last heard + k intervals).
A heartbeat only updates ``last_seen`` in a dict (O(1), called at ingest rate); when an
entry reaches the top of the heap and the worker was heard since, it is pushed back
with its new deadline. So detection is exact to the deadline, and 5,000 workers cost
a few hundred heap operations a second, not one per heartbeat.

A last will is a *suspicion* (``suspect``), not a verdict: a broker going down publishes
every client's will while we are still connected (Mosquitto on SIGTERM), and a broker
with persistence delivers them again after it is back. A suspect worker is lost once it
stays silent until its confirmation time (or its normal deadline, whichever is first);
any heartbeat or status from it after the will clears the suspicion. Whether we could
have heard it at all is the caller's question (``on_lost`` gets the suspicion to judge).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Suspicion:
    """A last will seen for a tracked worker."""

    at: float  # when the will was handled
    reason: str  # what the will said ("connection lost")
    confirm_at: float | None  # lost then unless heard since; None: only by its deadline
    epoch: int  # our broker connection when the will came (broker.bus.LinkState.epoch)


LostCallback = Callable[[str, float, "Suspicion | None"], None]
"""Called as (wid, silent for seconds, the suspicion that expired or None)."""


class HeartbeatMonitor:
    """Calls ``on_lost(wid, silent_for_s, suspicion)`` once a tracked worker misses its
    deadline, or stays silent after a last will until the will's confirmation time."""

    def __init__(
        self, factor: float, on_lost: LostCallback, clock: Callable[[], float] = time.time
    ) -> None:
        self.factor = factor
        self._on_lost = on_lost
        self._clock = clock
        self._last: dict[str, tuple[float, float]] = {}  # wid -> (last_seen, interval)
        self._suspects: dict[str, Suspicion] = {}
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}  # wid -> the time of its one live heap entry
        self._hold_until = 0.0  # nobody is found lost before this (a reconnect's grace)
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

    def _schedule(self, wid: str, at: float) -> None:
        """Make sure ``wid`` is looked at by ``at`` (call with the lock held)."""
        current = self._due.get(wid)
        if current is None or at < current:
            self._due[wid] = at
            heapq.heappush(self._heap, (at, wid))
            self._cond.notify()

    def track(self, wid: str, last_seen: float, interval: float) -> None:
        """Start (or keep) watching ``wid``; called on join, status online and restart.

        The worker spoke (or we decided to give it a fresh deadline): any suspicion ends.
        """
        with self._cond:
            self._last[wid] = (last_seen, interval)
            self._suspects.pop(wid, None)
            self._schedule(wid, last_seen + self.factor * interval)

    def beat(self, wid: str, now: float, interval: float) -> None:
        """Record a heartbeat. Cheap: no heap work unless the interval got shorter."""
        entry = self._last.get(wid)
        if entry is None:
            return
        self._last[wid] = (now, interval)
        if self._suspects:
            suspicion = self._suspects.get(wid)
            if suspicion is not None and now > suspicion.at:
                self._suspects.pop(wid, None)  # heard after its will: not dead
        if interval < entry[1]:
            # A shorter interval than the heap entry was pushed with: its deadline may
            # now be earlier than the one queued.
            with self._cond:
                self._schedule(wid, now + self.factor * interval)

    def suspect(self, wid: str, suspicion: Suspicion, interval: float) -> None:
        """A last will for ``wid``: lost at ``suspicion.confirm_at`` (or at its deadline)
        unless it is heard from after ``suspicion.at``. Tracks it if it was not tracked."""
        with self._cond:
            entry = self._last.get(wid)
            if entry is None:
                entry = self._last[wid] = (suspicion.at, interval)
            self._suspects[wid] = suspicion
            deadline = entry[0] + self.factor * entry[1]
            if suspicion.confirm_at is not None:
                deadline = min(deadline, suspicion.confirm_at)
            self._schedule(wid, deadline)

    def suspicion(self, wid: str) -> Suspicion | None:
        return self._suspects.get(wid)

    def suspects(self) -> int:
        """Workers whose last will is not confirmed or cleared yet."""
        return len(self._suspects)

    def refresh_all(self, now: float, hold_until: float = 0.0) -> None:
        """Give every tracked worker a full deadline from ``now`` (we were deaf), and find
        nobody lost before ``hold_until`` (the others are still reconnecting).

        Suspicions stay (their reasons still say why a worker that never comes back is
        lost) but lose their quick confirmation: a will seen before we were cut off is
        as likely the broker's going down as the worker's.
        """
        with self._cond:
            for wid, (_, interval) in list(self._last.items()):
                self._last[wid] = (now, interval)
            for wid, suspicion in list(self._suspects.items()):
                if suspicion.confirm_at is not None:
                    self._suspects[wid] = Suspicion(suspicion.at, suspicion.reason, None,
                                                    suspicion.epoch)
            self._hold_until = max(self._hold_until, hold_until)
            self._cond.notify()

    def held_until(self) -> float:
        return self._hold_until

    def forget(self, wid: str) -> None:
        """Stop watching ``wid`` (it went offline or was found lost)."""
        with self._cond:
            self._last.pop(wid, None)
            self._suspects.pop(wid, None)

    def tracked(self) -> int:
        return len(self._last)

    def _run(self) -> None:
        while True:
            expired: list[tuple[str, float, Suspicion | None]] = []
            with self._cond:
                if self._stop:
                    return
                now = self._clock()
                while self._heap and self._heap[0][0] <= now:
                    at, wid = heapq.heappop(self._heap)
                    if self._due.get(wid) != at:
                        continue  # superseded by an earlier entry
                    del self._due[wid]
                    entry = self._last.get(wid)
                    if entry is None:
                        continue
                    last_seen, interval = entry
                    suspicion = self._suspects.get(wid)
                    if suspicion is not None and last_seen > suspicion.at:
                        self._suspects.pop(wid, None)
                        suspicion = None
                    deadline = last_seen + self.factor * interval
                    if suspicion is not None and suspicion.confirm_at is not None:
                        deadline = min(deadline, suspicion.confirm_at)
                    deadline = max(deadline, self._hold_until)
                    if deadline > now:
                        self._schedule(wid, deadline)
                        continue
                    del self._last[wid]
                    self._suspects.pop(wid, None)
                    expired.append((wid, now - last_seen, suspicion))
                timeout = (self._heap[0][0] - now) if self._heap else 1.0
                if not expired:
                    self._cond.wait(max(0.005, min(timeout, 1.0)))
            for wid, silent, suspicion in expired:
                try:
                    self._on_lost(wid, silent, suspicion)
                except Exception:
                    log.exception("lost-worker handling failed for %s", wid)
