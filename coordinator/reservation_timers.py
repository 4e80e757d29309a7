"""Reservation deadlines: lease ends and client-gone grace periods, in one timer thread.

A reservation's lease runs out at ``expires_at`` unless renewed; a client whose connection
died (``client.gone``) has ``client_grace_s`` to say ``client.hello`` before its session's
reservations end. Both deadlines come from the database (wall-clock epoch seconds), so a
restarted coordinator re-arms them (``ReservationService`` does, on start).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

TimerKey = tuple[str, ...]
LEASE = "lease"  # key ("lease", reservation id)
GRACE = "gone"  # key ("gone", client id, session)


class DeadlineTimers:
    """Calls ``fire(key)`` once ``key``'s deadline passes; one thread for any number of keys.

    ``arm`` replaces a key's deadline and ``cancel`` drops it; superseded heap entries are
    skipped when they surface (cheaper than removing them), as in ``HeartbeatMonitor``.
    Deadlines are wall-clock epoch seconds because they come from the database.
    """

    def __init__(self, fire: Callable[[TimerKey], None], *, name: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._fire = fire
        self._name = name
        self._clock = clock
        self._deadlines: dict[TimerKey, float] = {}
        self._heap: list[tuple[float, int, TimerKey]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(10)

    def arm(self, key: TimerKey, at: float) -> None:
        with self._cond:
            self._deadlines[key] = at
            heapq.heappush(self._heap, (at, next(self._seq), key))
            self._cond.notify()

    def cancel(self, key: TimerKey) -> None:
        with self._cond:
            self._deadlines.pop(key, None)

    def deadline(self, key: TimerKey) -> float | None:
        with self._cond:
            return self._deadlines.get(key)

    def _run(self) -> None:
        while True:
            due: list[TimerKey] = []
            with self._cond:
                if self._stopped:
                    return
                now = self._clock()
                while self._heap and self._heap[0][0] <= now:
                    at, _, key = heapq.heappop(self._heap)
                    if self._deadlines.get(key) == at:
                        del self._deadlines[key]
                        due.append(key)
                if not due:
                    timeout = (self._heap[0][0] - now) if self._heap else 1.0
                    self._cond.wait(max(0.005, min(timeout, 1.0)))
            for key in due:
                try:
                    self._fire(key)
                except Exception:
                    log.exception("timer %s failed", key)


class ReservationTimers(DeadlineTimers):
    """Lease and grace deadlines: ``on_lease_end(rid)``, ``on_grace_end(client, session)``.

    The callbacks run on the timer thread and must decide again from the database (a
    renewal or a hello may have won the race).
    """

    def __init__(self, on_lease_end: Callable[[str], None],
                 on_grace_end: Callable[[str, str], None], *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(self._dispatch, name="reservation-timers", clock=clock)
        self._on_lease_end = on_lease_end
        self._on_grace_end = on_grace_end

    def arm_lease(self, rid: str, at: float) -> None:
        self.arm((LEASE, rid), at)

    def cancel_lease(self, rid: str) -> None:
        self.cancel((LEASE, rid))

    def arm_grace(self, client: str, session: str, at: float) -> None:
        self.arm((GRACE, client, session), at)

    def cancel_grace(self, client: str, session: str) -> None:
        self.cancel((GRACE, client, session))

    def _dispatch(self, key: TimerKey) -> None:
        if key[0] == LEASE:
            self._on_lease_end(key[1])
        elif key[0] == GRACE:
            self._on_grace_end(key[1], key[2])
