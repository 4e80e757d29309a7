"""``job.assign`` requests in flight, and their answers handled on one thread.

A worker's ``ok`` to ``job.assign`` is the acknowledgement of the attempt (docs/jobs.md,
"Assignment"). Until 2026-11-28 each assignment held a thread of a 16-thread pool that
sent it and then waited for that answer: two thread hand-offs and a transaction per job.
Now the scheduler's own thread sends the request (``Bus.request_async``: nothing
waits), the answer's future queues the attempt here, and one thread takes every answer
queued so far at once: the acknowledgements of all of them in one transaction, each
refusal as before. An attempt's accepted report answers its assignment as well
(``reported``: workers hold the ``ok`` back briefly, and a short job never sends it). The
same thread ends the assignments that got no answer within
``jobs.assign_ack_s`` (``lease_expired``, and ``job.kill`` to the worker: no ghost
tasks); the scheduler's pass looks for those too, from the store, after a restart.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any, Protocol

from broker.bus import Bus, BusError
from coordinator.errors import CoordinatorError
from coordinator.store import Store
from coordinator.store.job_records import AttemptRecord
from schemas.codec import Envelope
from schemas.job_messages import JobAssign
from schemas.messages import Error, Ok
from schemas.topics import Topics

log = logging.getLogger(__name__)

IDLE_WAKE_S = 1.0  # with nothing in flight, look again this often (for ``close``)


class AssignOwner(Protocol):
    """What the scheduler gives: the deadline, and what a refusal or silence does."""

    def ack_deadline_s(self) -> float: ...

    def refused(self, attempt: AttemptRecord, error: Error) -> None: ...

    def unanswered(self, attempt: AttemptRecord) -> None: ...


@dataclass
class InFlight:
    attempt: AttemptRecord
    future: Future[Envelope[Any]]
    deadline: float  # monotonic


class AssignAcks:
    """See the module docstring. ``send`` from any thread; ``close`` when stopping."""

    def __init__(self, bus: Bus, store: Store, topics: Topics, owner: AssignOwner, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self.store = store
        self.topics = topics
        self.owner = owner
        self._clock = clock
        self._answered: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._flight: dict[str, InFlight] = {}  # as many as free slots were filled
        # (deadline, attempt) of what was sent, earliest first; an answered one stays
        # until it reaches the top: a wake costs O(log n), not a scan of all in flight
        self._deadlines: list[tuple[float, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="job-assign-acks",
                                        daemon=True)
        self._thread.start()

    def send(self, attempt: AttemptRecord, body: JobAssign) -> None:
        """Send ``job.assign``; its answer is handled on this object's thread. Not sent
        (broker down, stopping): the deadline ends it, as an unanswered one."""
        if self._closed:
            return
        try:
            future = self.bus.request_async(self.topics.worker_inbox(attempt.worker_id), body)
        except BusError as err:
            log.warning("job.assign %s to %s not sent: %s", attempt.id, attempt.worker_id, err)
            future = Future()  # never answered: it expires like a silent worker's
        self._await(attempt, future)

    def carried(self, attempt: AttemptRecord, body: JobAssign) -> Envelope[Any] | None:
        """``job.assign`` as a message another carries (the report's answer,
        ``attempt.recorded``): its answer is awaited as ``send``'s. None: stopping (the
        deadline check ends the attempt)."""
        if self._closed:
            return None
        try:
            env, future = self.bus.request_carried(body)
        except BusError as err:
            log.warning("job.assign %s to %s not carried: %s", attempt.id, attempt.worker_id,
                        err)
            self._await(attempt, Future())  # never answered: it expires
            return None
        self._await(attempt, future)
        return env

    def _await(self, attempt: AttemptRecord, future: Future[Envelope[Any]]) -> None:
        aid = attempt.id
        deadline = time.monotonic() + self.owner.ack_deadline_s()
        with self._lock:
            self._flight[aid] = InFlight(attempt, future, deadline)
            heapq.heappush(self._deadlines, (deadline, aid))
        # (a cancelled one was settled where it was cancelled: a report, an expiry or
        # close; queueing it would only wake this object's thread for nothing, per job)
        future.add_done_callback(lambda f: None if f.cancelled() else self._answered.put(aid))

    def reported(self, aid: str) -> None:
        """The attempt's report was accepted: it acknowledged the assignment too (a worker
        holds its ``ok`` back briefly, and a short job's report makes it unneeded:
        worker/assign_answers.py), so no answer is awaited any more."""
        with self._lock:
            item = self._flight.pop(aid, None)
        if item is not None:
            item.future.cancel()  # (the bus forgets it; a late ok finds nothing)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._flight)

    def close(self, join_s: float = 5.0) -> None:
        """Stop: what is in flight is forgotten (the pass's deadline check ends it after
        a restart)."""
        self._closed = True
        self._answered.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(join_s)
        with self._lock:
            flight, self._flight = list(self._flight.values()), {}
            self._deadlines = []
        for item in flight:
            item.future.cancel()

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            first = self._get()
            if first is None and self._closed:
                return
            ids = [] if first is None else [first]
            while True:  # everything answered meanwhile, in one go
                try:
                    more = self._answered.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    return
                ids.append(more)
            try:
                self._handle(ids)
                self._expire()
            except Exception:  # never let the thread die: assignments would pile up
                log.exception("handling job.assign answers failed")

    def _wait_s(self) -> float:
        with self._lock:
            while self._deadlines and self._deadlines[0][1] not in self._flight:
                heapq.heappop(self._deadlines)  # answered already
            if not self._deadlines:
                return IDLE_WAKE_S
            head = self._deadlines[0][0]
        return min(IDLE_WAKE_S, max(0.0, head - time.monotonic()) + 0.001)

    def _get(self) -> str | None:
        try:
            return self._answered.get(timeout=self._wait_s())
        except queue.Empty:
            return None

    def _handle(self, ids: list[str]) -> None:
        done: list[InFlight] = []
        with self._lock:
            for aid in ids:
                item = self._flight.pop(aid, None)
                if item is not None:
                    done.append(item)
        oks: list[str] = []
        for item in done:
            try:
                reply = item.future.result(0)
            except CancelledError:
                continue  # expired or closed: handled there
            except Exception as err:
                log.warning("job.assign %s to %s failed: %s", item.attempt.id,
                            item.attempt.worker_id, err)
                continue  # the pass's deadline check ends it
            if isinstance(reply.body, Ok):
                oks.append(item.attempt.id)
            elif isinstance(reply.body, Error):
                self.owner.refused(item.attempt, reply.body)
        if oks:
            try:
                self.store.acknowledge_attempts(oks, now=self._clock())
            except CoordinatorError as err:
                log.error("acknowledgement of %d attempt(s) not recorded: %s", len(oks), err)

    def _expire(self) -> None:
        now = time.monotonic()
        overdue: list[InFlight] = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                item = self._flight.pop(heapq.heappop(self._deadlines)[1], None)
                if item is not None:  # (None: answered before its deadline)
                    overdue.append(item)
        for item in overdue:
            item.future.cancel()  # (the bus forgets it; a late answer finds nothing)
            self.owner.unanswered(item.attempt)
