"""JobEventOutbox: job state changes to their owners and the admins' feed, several per message.

Every committed job state change goes to its owner's inbox (QoS 1) and once to the admins'
feed ``<root>/events/jobs`` (QoS 0). Sent one message per change, that was four publishes per
job (running, then completed) and as many PUBACKs, decodes and hand-offs in the owner's
client: at full rate, most of what a job cost the broker and the client. So the changes go
through this outbox (docs/jobs.md, "Watching job events"):

- one thread sends them, in the order they were queued (``put``);
- a change that comes while nothing gathers goes out at once (an idle grid's events);
  once a send carried several changes (they came faster than one send each), the thread
  gathers what comes for the rest of ``flush_s`` after it and sends it together: one
  ``job.events`` per owner (at most ``MAX_EVENTS_PER_MESSAGE`` each) and one on the feed,
  and so on while they keep coming;
- an owner gets ``job.events`` only while every session of it the coordinator knows of
  (sessions come with ``client.hello``, which an older client sends too, and go with
  ``client.gone``) has said ``client.accepts`` with that type; any other owner (an older
  client, or one not heard from since this coordinator started: clients say hello again
  when a coordinator comes up) gets one ``job.event`` per change, as before. (An older
  client that connected before this coordinator started, beside a newer session of the
  same principal, is not known: it gets ``job.events`` it drops, and completes its futures
  by polling.)

Events are a live view: a client completes its futures by polling too, so an event lost
with a disconnect costs a delay, never a result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from broker.bus import Bus, BusError, Incoming, MessageTooLarge
from coordinator.store.job_records import JobChange
from schemas.codec import encode, envelope
from schemas.job_messages import MAX_EVENTS_PER_MESSAGE, JobEvent, JobEvents
from schemas.messages import Body, ClientAccepts, Ok
from schemas.topics import Topics

log = logging.getLogger(__name__)

BATCHED = JobEvents.TYPE
MAX_PRINCIPALS = 4096  # principals whose sessions are remembered (oldest forgotten first)
MAX_SESSIONS = 16  # sessions remembered per principal (oldest forgotten first)


def event_item(change: JobChange) -> dict[str, Any]:
    """The wire fields of one change (``job.event`` and a ``job.events`` item)."""
    item: dict[str, Any] = {"job": change.job, "state": change.state.value, "at": change.at}
    if change.attempt is not None:
        item["attempt"] = change.attempt
    if change.worker is not None:
        item["worker"] = change.worker
    if change.exit_code is not None:
        item["exit_code"] = change.exit_code
    if change.reason:
        item["reason"] = change.reason[:1024]
    return item


class SessionAccepts:
    """Which sessions of each principal accept ``job.events`` (bounded, thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_principal: OrderedDict[str, OrderedDict[str, bool]] = OrderedDict()

    def note(self, principal: str, session: str, batched: bool) -> None:
        with self._lock:
            sessions = self._by_principal.pop(principal, None) or OrderedDict()
            sessions.pop(session, None)
            sessions[session] = batched
            while len(sessions) > MAX_SESSIONS:
                sessions.popitem(last=False)
            self._by_principal[principal] = sessions
            while len(self._by_principal) > MAX_PRINCIPALS:
                self._by_principal.popitem(last=False)

    def forget(self, principal: str, session: str) -> None:
        with self._lock:
            sessions = self._by_principal.get(principal)
            if sessions is not None:
                sessions.pop(session, None)
                if not sessions:
                    del self._by_principal[principal]

    def batched(self, principal: str) -> bool:
        """Whether every known session of ``principal`` accepts ``job.events`` (False when
        none is known)."""
        with self._lock:
            sessions = self._by_principal.get(principal)
            return sessions is not None and all(sessions.values())


class JobEventOutbox:
    """See the module docstring. ``start`` before the first ``put``; ``stop`` sends what
    is queued."""

    def __init__(self, bus: Bus, topics: Topics, *, flush_s: float = 0.02,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.topics = topics
        self.flush_s = max(0.0, flush_s)
        self.sessions = SessionAccepts()
        self._clock = clock
        self._lock = threading.Lock()
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()  # (owner, item)
        self._sending = threading.Lock()  # one sender at a time (``stop`` after a slow
        # join): the queue's order kept
        self._last = -1e9  # when the last send was
        self._sent = 0  # how many changes it carried
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="job-events", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.flush()  # what came after the thread's last look

    # -- producers --------------------------------------------------------------------

    def put(self, changes: Iterable[JobChange]) -> None:
        """Queue committed changes for their owners (any thread; never blocks on the bus).
        (Sending single changes from the caller's thread instead, when nothing gathers,
        was measured: no faster on an idle grid, and a third of the batching under load.)"""
        items = [(change.owner, event_item(change)) for change in changes]
        if not items:
            return
        with self._lock:
            self._queue.extend(items)
        self._wake.set()

    # -- sessions (client.accepts, client.gone) ---------------------------------------

    def client_hello(self, principal: str, session: str) -> None:
        """A session (re)connected: until its ``client.accepts`` (which follows on the same
        lane) it counts as one that takes only ``job.event``."""
        if session:
            self.sessions.note(principal, session, False)

    def client_accepts(self, incoming: Incoming) -> Body:
        """``client.accepts`` from a client session (after its ``client.hello``)."""
        req: ClientAccepts = incoming.body
        assert incoming.sender is not None
        if req.session:
            self.sessions.note(incoming.sender, req.session, BATCHED in req.types)
        return Ok()

    def client_gone(self, principal: str, session: str) -> None:
        """A session's last will: it no longer decides how its principal's events go."""
        if session:
            self.sessions.forget(principal, session)

    # -- the sending thread -----------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            # Changes came faster than one send each (the last send carried several) and
            # that was a moment ago: gather for the rest of flush_s. Else (a quiet spell,
            # or single changes far enough apart: an idle grid's jobs) send at once.
            with self._lock:
                wait = self._last + self.flush_s - self._clock() if self._sent > 1 else 0.0
            if wait > 0 and self._stop.wait(wait):
                return
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # this thread sends every event: it must not end
                log.exception("job events")

    def flush(self) -> int:
        """Send everything queued now, in order (the thread's step; ``stop`` runs it once
        more); returns the number of changes sent."""
        with self._sending:
            with self._lock:
                items = list(self._queue)
                self._queue.clear()
                if items:
                    self._last, self._sent = self._clock(), len(items)
            if items:
                self._send_all(items)
            return len(items)

    def _send_all(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        by_owner: dict[str, list[dict[str, Any]]] = {}
        for owner, item in items:
            by_owner.setdefault(owner, []).append(item)
        for owner, events in by_owner.items():
            inbox = self.topics.client_inbox(owner)
            bodies: list[Body] = ([JobEvents(events=chunk) for chunk in _chunks(events)]
                                  if self.sessions.batched(owner)
                                  else [JobEvent.of(item) for item in events])
            for body in bodies:
                self._send(body, inbox=inbox)
        for chunk in _chunks([item for _owner, item in items]):
            self._send(JobEvents(events=chunk))

    def _send(self, body: Body, *, inbox: str | None = None) -> None:
        """Into an owner's inbox (QoS 1, under our sender id), else on the feed (QoS 0).
        A batch over ``bus.max_payload`` (set small) goes in halves."""
        try:
            payload = encode(envelope(body))
            if inbox is not None:
                self.bus.send(inbox, payload)
            else:
                self.bus.publish_bytes(self.topics.admin_job_events, payload, qos=0)
        except MessageTooLarge:
            if not isinstance(body, JobEvents) or len(body.events) < 2:
                log.warning("%s not sent: over bus.max_payload", body.TYPE)
                return
            half = len(body.events) // 2
            self._send(JobEvents(events=body.events[:half]), inbox=inbox)
            self._send(JobEvents(events=body.events[half:]), inbox=inbox)
        except (BusError, ValueError) as err:
            log.warning("%s not sent: %s", body.TYPE, err)


def _chunks(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [items[i:i + MAX_EVENTS_PER_MESSAGE]
            for i in range(0, len(items), MAX_EVENTS_PER_MESSAGE)]
