"""``grid.jobs.watch()``: a live stream of job state changes (docs/jobs.md, "Watching
job events").

A client's watch reads the ``job.event`` and ``job.events`` messages the coordinator
sends to its own inbox (its own jobs only; the Grid routes them here through
``JobStore.on_events``). An admin's ``watch(all=True)`` reads the admins' feed instead,
``<root>/events/jobs`` (``Topics.admin_job_events``): the coordinator publishes every event
there once (several per ``job.events`` while they come fast), and the
broker's ACL lets only admins subscribe (docs/security.md). The feed is subscribed while
at least one such watch is open, so an admin session that stopped watching does not keep
receiving every job's events.

Events are a live view: what happened before the watch opened, or while the session was
disconnected, is not replayed (``grid.jobs.ls`` and ``show`` tell the current state).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from broker.bus import BusError, Lane
from client.errors import ClientError
from client.reservation import Refused
from schemas.job_messages import JobEvent, JobEvents, JobsList

if TYPE_CHECKING:
    from types import TracebackType

    from broker.bus import Incoming
    from client.jobs import JobStore

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a blocked ``next`` looks whether the watch or session closed
QUEUE_MAX = 10_000  # events kept for a slow reader; beyond, the oldest are dropped
_NOBODY = "~"  # a principal id no one is asked about: listing its jobs is an admin's right


class JobWatch(Iterator[JobEvent]):
    """An iterator of :class:`JobEvent` as they come, until :meth:`close` (or the
    session closes). Also a context manager; ``dropped`` counts events a slow reader
    lost (the queue keeps the newest ``QUEUE_MAX``)."""

    def __init__(self, router: WatchRouter, everyone: bool) -> None:
        self.everyone = everyone
        self.dropped = 0
        self._router = router
        self._queue: queue.Queue[JobEvent] = queue.Queue()
        self._closed = threading.Event()

    def put(self, event: JobEvent) -> None:
        if self._queue.qsize() >= QUEUE_MAX:
            try:
                self._queue.get_nowait()
                self.dropped += 1
            except queue.Empty:
                pass
        self._queue.put(event)

    def get(self, timeout: float | None = None) -> JobEvent | None:
        """The next event, or None when ``timeout`` passed (or the watch closed) first."""
        waited = 0.0
        while not self._closed.is_set() and not self._router.session_closed():
            step = POLL_S if timeout is None else min(POLL_S, timeout - waited)
            if step <= 0:
                return None
            try:
                return self._queue.get(timeout=step)
            except queue.Empty:
                waited += step
        return None

    def __iter__(self) -> JobWatch:
        return self

    def __next__(self) -> JobEvent:
        event = self.get()
        if event is None:
            raise StopIteration
        return event

    def close(self) -> None:
        """Stop watching (the admins' feed is left once no watch needs it)."""
        if not self._closed.is_set():
            self._closed.set()
            self._router.remove(self)

    def __enter__(self) -> JobWatch:
        return self

    def __exit__(self, _type: type[BaseException] | None, _value: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.close()


class WatchRouter:
    """Hands job events to the open watches of one Grid (one router per ``JobStore``)."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._watches: list[JobWatch] = []
        self._feed = False  # subscribed to the admins' feed

    def session_closed(self) -> bool:
        return self._store.grid._closed.is_set()

    def open(self, everyone: bool) -> JobWatch:
        """A new watch: ``everyone`` needs an admin (checked with the coordinator first,
        so a client gets a clear refusal rather than a silent, empty feed)."""
        grid = self._store.grid
        if everyone:
            try:
                grid.ask(JobsList(owner=_NOBODY if grid.principal != _NOBODY else "~~",
                                  limit=1), what="check the right to watch every job")
            except Refused as err:
                if err.code != "forbidden":
                    raise
                raise Refused("only admins can watch every job's events; without --all "
                              "(all=True) you watch your own jobs", "forbidden") from None
        watch = JobWatch(self, everyone)
        with self._lock:
            self._watches.append(watch)
            subscribe = everyone and not self._feed
            self._feed = self._feed or everyone
        if subscribe:
            try:
                grid.bus.subscribe(grid.topics.admin_job_events, self.on_feed,
                                   lane=Lane.JOBS, types=(JobEvent.TYPE, JobEvents.TYPE))
            except BusError as err:
                watch.close()
                raise ClientError(f"cannot watch job events: {err}") from err
        return watch

    def remove(self, watch: JobWatch) -> None:
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)
            leave = self._feed and not any(w.everyone for w in self._watches)
            if leave:
                self._feed = False
        if leave:
            try:
                self._store.grid.bus.unsubscribe(self._store.grid.topics.admin_job_events)
            except (BusError, ValueError, KeyError) as err:  # disconnected: nothing to leave
                log.debug("leaving the job events feed: %s", err)

    def _deliver(self, events: list[JobEvent], everyone: bool) -> None:
        with self._lock:
            watches = [w for w in self._watches if w.everyone == everyone]
        for watch in watches:
            for event in events:
                watch.put(event)

    def on_inbox(self, events: list[JobEvent]) -> None:
        """Events from our own inbox (the Grid checked they came from the coordinator)."""
        self._deliver(events, everyone=False)

    def on_feed(self, incoming: Incoming) -> None:
        """``job.events`` (or, from an older coordinator, ``job.event``) on the admins'
        feed: only the coordinator may publish there (ACL)."""
        body = incoming.body
        self._deliver(body.each() if isinstance(body, JobEvents) else [body], everyone=True)


def event_line(event: JobEvent) -> str:
    """One event as ``xcloud jobs --watch`` prints it (time, job, state, the rest)."""
    import time

    parts = [time.strftime("%H:%M:%S", time.localtime(event.at)), event.job,
             f"{event.state:<9}"]
    if event.attempt:
        parts.append(f"attempt {event.attempt}" + (f" on {event.worker}"
                                                   if event.worker else ""))
    if event.exit_code is not None:
        parts.append(f"exit {event.exit_code}")
    if event.reason:
        parts.append(event.reason.splitlines()[0][:200] if event.reason.strip() else "")
    return "  ".join(p for p in parts if p)
