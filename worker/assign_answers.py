"""The worker's side of ``job.assign`` beyond the runner: its ``ok``, held back a moment so
that a short job's report answers the assignment instead, and the assignments that ride in
the answer to a report.

That ``ok`` is the acknowledgement the coordinator waits for (docs/jobs.md,
"Assignment"), and the attempt's ``attempt.report`` acknowledges it as well: the
coordinator takes the report of an attempt it has no ``ok`` for as both. So the ``ok``
waits up to ``[worker] job_ack_wait_s`` (0.1 s) after the attempt is persisted: a job that
ends and is reported within that time never sends it, one message and its broker
acknowledgement fewer each way per short job; a longer job's ``ok`` goes when the wait
ends, well within the coordinator's ``assign_ack_s`` (10 s). 0 answers at once.

Nothing is lost by the wait: the attempt is written before it starts, and a report that
the coordinator does not accept at once (``busy``, ``unavailable``, ...) leaves the ``ok``
to go when its time comes, as before.

Durable before acknowledged: the acceptance is written through when the attempt is
accepted, not synced; every ``ok`` goes only after the attempt journal is made durable
(``durable``: one ``fdatasync`` for all the answers due together, off the I/O loop), and
a report that answers the assignment is durable itself (its fdatasync covers the
acceptance written before it). A short job pays one ``fdatasync``, not two.

The coordinator answers the report of a worker of agent 0.3 or later with
``attempt.recorded``, which may carry the next ``job.assign`` messages for the slots that
report freed (docs/jobs.md, "Assignment in the report's answer"): ``deliver_carried``
hands each to the bus as if it had come alone (the runner's ``on_assign`` on its lane,
behind the request guard; its ``ok`` goes to the coordinator like any answer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker.bus import Bus, BusError, Incoming
from schemas.codec import from_wire
from schemas.errors import WireError
from schemas.job_messages import JobAssign
from schemas.messages import Ok

if TYPE_CHECKING:
    from worker.io_loop import IoLoop, Timer

log = logging.getLogger(__name__)

MAX_WAIT_S = 1.0  # well inside the coordinator's assign_ack_s (10 s by default)


class HeldAnswers:
    """``ok`` answers to ``job.assign`` held back (see the module docstring). Thread-safe.

    One I/O loop timer sweeps them all (each hold and spare costs a dict entry, not a
    timer's wake of the loop: at hundreds of jobs per second that was two wakes a job)."""

    def __init__(self, bus: Bus, wait_s: float, loop: IoLoop, *,
                 durable: Callable[[], None],
                 offload: Callable[[Callable[[], None]], None]) -> None:
        """``durable`` makes every accepted attempt durable (OSError if not): called
        before any ``ok``; ``offload`` runs a call off the I/O loop (the sweep's answers,
        since ``durable`` waits for the disk)."""
        self.bus = bus
        self.durable = durable
        self.offload = offload
        self.wait_s = min(max(0.0, float(wait_s)), MAX_WAIT_S)
        if self.wait_s != wait_s:
            log.warning("[worker] job_ack_wait_s = %s is outside 0..%g s: %g s is used (a "
                        "longer wait would let the coordinator's assign_ack_s end running "
                        "attempts)", wait_s, MAX_WAIT_S, self.wait_s)
        self.loop = loop
        self._lock = threading.Lock()
        self._held: dict[str, tuple[Incoming, float]] = {}  # attempt -> (request, due)
        self._timer: Timer | None = None  # the sweep, while anything is held
        self.sent = 0  # answers that went (at once or when their wait ended)
        self.spared = 0  # answers the attempt's accepted report made unneeded

    def hold(self, attempt: str, request: Incoming) -> None:
        """Answer ``request`` (the attempt's ``job.assign``) ``ok`` after the wait, unless
        ``spare`` comes first."""
        if self.wait_s <= 0:
            self._answer([(attempt, request)])
            return
        due = time.monotonic() + self.wait_s
        with self._lock:
            self._held[attempt] = (request, due)
            timer = self._timer
            if timer is not None and due < timer.when:  # (a shorter wait set meanwhile)
                timer.cancel()
                timer = None
            if timer is None:
                self._timer = self.loop.call_later(self.wait_s, self._sweep)

    def again(self, attempt: str, request: Incoming) -> None:
        """A repeated ``job.assign`` of an attempt accepted here: ``ok`` at once (with
        ``existing``), durable first as every ``ok``."""
        self._answer([(attempt, request)], existing=True)

    def spare(self, attempt: str) -> None:
        """The coordinator has the attempt's report (or no longer wants an answer): the
        ``ok`` is not sent."""
        with self._lock:
            if self._held.pop(attempt, None) is not None:
                self.spared += 1

    def close(self) -> None:
        """Stopping: held answers are dropped (the attempts are being forgotten)."""
        with self._lock:
            self._held.clear()
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _sweep(self) -> None:
        """On the loop: the answers whose wait is over go; the sweep comes again for the
        next one due."""
        now = time.monotonic()
        with self._lock:
            due = [(a, r) for a, (r, at) in self._held.items() if at <= now]
            for attempt, _request in due:
                del self._held[attempt]
            nxt = min((at for _r, at in self._held.values()), default=None)
            self._timer = (None if nxt is None else
                           self.loop.call_later(max(0.0, nxt - now), self._sweep))
        if due:
            self.offload(lambda: self._answer(due))

    def _answer(self, due: list[tuple[str, Incoming]], existing: bool = False) -> None:
        """Make the accepted attempts durable, then answer each ``ok``. Unanswered (a
        disk that fails the sync, a bus down), the coordinator's ``assign_ack_s`` decides:
        it offers the job elsewhere and has this attempt killed."""
        try:
            self.durable()
        except OSError as err:
            log.error("cannot make accepted attempts durable, not acknowledged: %s", err)
            return
        for attempt, request in due:
            try:
                self.bus.reply(request, Ok(detail={"attempt": attempt, **(
                    {"existing": True} if existing else {})}))
            except (BusError, RuntimeError) as err:
                log.warning("cannot acknowledge attempt %s now: %s", attempt, err)
                continue
            if not existing:
                with self._lock:
                    self.sent += 1


def deliver_carried(bus: Bus, inbox_topic: str, coordinator: str,
                    items: list[dict[str, Any]]) -> None:
    """Each ``job.assign`` in ``items`` (from the coordinator's ``attempt.recorded``) to the
    bus as one received alone on ``inbox_topic``. Called on the network thread: nothing
    here blocks (the bus queues each on its handler's lane)."""
    for item in items:
        try:  # (the answer was validated whole, its items as job.assign)
            env = from_wire(item, topic=inbox_topic, carried_as=JobAssign.TYPE)
        except (WireError, KeyError, TypeError, ValueError) as err:
            log.warning("a job.assign carried in a report's answer is invalid: %s", err)
            continue
        bus.deliver_carried(Incoming(inbox_topic, env, coordinator,
                                     received_at=time.monotonic()))
