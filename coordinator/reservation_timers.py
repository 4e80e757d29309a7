"""Reservation deadlines: lease ends and client-gone grace periods, in one timer thread.

A reservation's lease runs out at ``expires_at`` unless renewed; a client whose connection
died (``client.gone``) has ``client_grace_s`` to say ``client.hello`` before its session's
reservations end. Both deadlines come from the database (wall-clock epoch seconds), so a
restarted coordinator re-arms them (``ReservationService`` does, on start).

Nothing ends while the coordinator is cut off from the broker: a holder cannot renew and
a client cannot say hello when nobody hears it, so deadlines that pass during an outage
wait for the connection, and after a *re*connect for ``resume_grace_s`` more (the clients
reconnect with their own back-off and then renew). The stored deadlines do not move; the
timers only hold back (docs/state-machines.md, "Broker outages").
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from broker.bus import LinkState

log = logging.getLogger(__name__)

LINK_POLL_S = 0.1  # how often due deadlines look at a broken link again

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
                 clock: Callable[[], float] = time.time,
                 link: Callable[[], LinkState] | None = None,
                 resume_grace_s: float = 0.0) -> None:
        self._fire = fire
        self._name = name
        self._clock = clock
        self._link = link
        self._resume_grace_s = max(0.0, resume_grace_s)
        self._epoch_seen = 0  # the connection whose grace was applied (1: the first)
        self._not_before = 0.0  # nothing fires before this (a reconnect's grace)
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

    def held_for(self) -> float:
        """Seconds the timers hold back due deadlines from now (0: they fire when due).

        ``inf`` while the link is down, the grace left after a reconnect otherwise.
        """
        with self._cond:
            if self._link is not None and not self._link().connected:
                return float("inf")
            wait = self._gate(self._clock())
        return wait or 0.0

    def _gate(self, now: float) -> float | None:
        """None when due deadlines may fire now, else how long to wait before looking again.

        Called with the lock held, and only when something is due (one cheap look at the
        link, not one per timer).
        """
        if self._link is None:
            return None
        state = self._link()
        if not state.connected:
            return LINK_POLL_S
        if state.epoch != self._epoch_seen:
            if state.epoch > 1:  # a reconnect, not our first connection
                self._not_before = max(self._not_before, state.since + self._resume_grace_s)
                log.info("%s: back on the broker; nothing ends for %.1fs", self._name,
                         max(0.0, self._not_before - now))
            self._epoch_seen = state.epoch
        if now < self._not_before:
            return self._not_before - now
        return None

    def _run(self) -> None:
        while True:
            due: list[TimerKey] = []
            with self._cond:
                if self._stopped:
                    return
                now = self._clock()
                if self._heap and self._heap[0][0] <= now:
                    wait = self._gate(now)
                    if wait is not None:
                        self._cond.wait(min(max(0.005, wait), 1.0))
                        continue
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
                 clock: Callable[[], float] = time.time,
                 link: Callable[[], LinkState] | None = None,
                 resume_grace_s: float = 0.0) -> None:
        super().__init__(self._dispatch, name="reservation-timers", clock=clock, link=link,
                         resume_grace_s=resume_grace_s)
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
