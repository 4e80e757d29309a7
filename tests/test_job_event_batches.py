"""Job events several per message (coordinator/job_event_outbox.py; docs/jobs.md, "Watching
job events"): a principal whose every session said ``client.accepts`` ``job.events`` gets
them batched, in commit order; a principal with a session that did not (an older client)
gets one ``job.event`` per change; the admins' feed gets batches; a batch is at most
``MAX_EVENTS_PER_MESSAGE`` events and halves when it is over ``bus.max_payload``; while
changes keep coming they go out at most once per ``flush_s``.
"""

from __future__ import annotations

import functools
import json
import threading
import uuid
from typing import Any

import pytest

from broker.bus import Bus, Incoming
from client.api import Grid
from coordinator.job_event_outbox import JobEventOutbox
from coordinator.job_state import JobState
from coordinator.store.job_records import JobChange
from schemas.codec import decode
from schemas.errors import WireError
from schemas.job_messages import (
    MAX_EVENTS_PER_MESSAGE,
    JobEvent,
    JobEvents,
    JobsCancel,
    JobsSubmit,
    JobsSubmitted,
)
from schemas.messages import ClientAccepts, ClientGone, ClientHello
from tests.fixtures.grid import COORDINATOR, GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import start_jobs_coordinator


class Inbox:
    """A raw client session of ``principal``: the job events its inbox gets, per message."""

    def __init__(self, grid: GridHarness, principal: str, *, accepts: bool | None) -> None:
        """``accepts`` None: says nothing to the coordinator (there is none)."""
        self.grid = grid
        self.principal = principal
        self.session = f"s-{uuid.uuid4().hex[:12]}"
        self.messages: list[list[JobEvent]] = []
        self.types: list[str] = []
        self._lock = threading.Lock()
        self.bus = grid.bus(principal, "client", inbox=grid.topics.client_inbox(principal),
                            client_id=self.session, start=False)
        self.bus.on_inbox(JobEvent.TYPE, self._on)
        self.bus.on_inbox(JobEvents.TYPE, self._on)
        self.bus.start(timeout=5)
        if accepts is None:
            return
        self.ask(ClientHello(session=self.session))
        if accepts:
            self.ask(ClientAccepts(session=self.session, types=[JobEvents.TYPE]))

    def _on(self, incoming: Incoming) -> None:
        body = incoming.body
        with self._lock:
            self.types.append(body.TYPE)
            self.messages.append(body.each() if isinstance(body, JobEvents) else [body])

    def ask(self, body: Any) -> Any:
        return self.bus.request(self.grid.topics.coord_inbox, body, raise_errors=False).body

    def events(self) -> list[JobEvent]:
        with self._lock:
            return [e for message in self.messages for e in message]

    def cancelled(self, jobs: list[str]) -> list[str]:
        """Wait for every job's ``cancelled`` event; the jobs in the order they came."""
        wanted = set(jobs)
        wait_for(lambda: wanted <= {e.job for e in self.events() if e.state == "cancelled"},
                 timeout=20, message=f"cancelled events in {self.principal}'s inbox")
        return [e.job for e in self.events() if e.state == "cancelled"]


def submit_and_cancel(client: Inbox, count: int) -> list[str]:
    """``count`` jobs (no worker runs them), then one cancel of all: one announce."""
    reply = client.ask(JobsSubmit(jobs=[{"command": "true"} for _ in range(count)]))
    assert isinstance(reply, JobsSubmitted), reply
    client.ask(JobsCancel(jobs=list(reply.ids)))
    return list(reply.ids)


def test_batched_for_sessions_that_accept_single_for_older_ones(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = Inbox(grid, "alice", accepts=True)
    bob = Inbox(grid, "bob", accepts=False)  # an older client: client.hello only
    jobs = submit_and_cancel(alice, 40)
    assert alice.cancelled(jobs) == jobs  # all of them, once each, in commit order
    assert set(alice.types) == {JobEvents.TYPE}
    assert len(alice.messages) < len(jobs)
    bobs = submit_and_cancel(bob, 5)
    assert bob.cancelled(bobs) == bobs
    assert bob.types == [JobEvent.TYPE] * len(bobs)
    assert not {e.job for e in alice.events()} & set(bobs)  # each owner its own


def test_an_older_session_of_the_same_principal_gets_single_events(
        grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    new = Inbox(grid, "alice", accepts=True)
    old = Inbox(grid, "alice", accepts=False)
    jobs = submit_and_cancel(new, 6)
    assert old.cancelled(jobs) == jobs
    assert new.cancelled(jobs) == jobs
    assert set(old.types) == {JobEvent.TYPE}  # what it can read
    # The older session's last will: the principal's events are batched again.
    new.bus.send(grid.topics.coord_inbox, ClientGone(session=old.session))
    wait_for(lambda: grid.coordinator is not None
             and grid.coordinator.scheduler.events.sessions.batched("alice"),
             timeout=10, message="alice's older session forgotten")
    more = submit_and_cancel(new, 6)
    new.cancelled(jobs + more)
    assert new.types[-1] == JobEvents.TYPE


def test_outbox_chunks_halves_and_gathers(grid: GridHarness) -> None:
    """The outbox alone on a real bus: chunks of at most MAX_EVENTS_PER_MESSAGE, halves
    of a batch over max_payload, and changes queued within ``flush_s`` of the last send
    gathered in one message."""
    alice = Inbox(grid, "alice", accepts=None)
    feed: list[int] = []
    admin = grid.bus("feed-admin", "admin", start=False)
    admin.subscribe(grid.topics.admin_job_events,
                    lambda i: feed.append(len(i.body.events)), types=(JobEvents.TYPE,))
    admin.start(timeout=5)
    bus: Bus = grid.bus(COORDINATOR, "coordinator", max_payload=24_000)
    outbox = JobEventOutbox(bus, grid.topics, flush_s=3.0)
    outbox.sessions.note("alice", alice.session, True)
    outbox.start()
    try:
        def changes(count: int, tag: str, reason: str = "") -> list[JobChange]:
            return [JobChange(job=f"j-{tag}{i:015x}"[:18], owner="alice",
                              state=JobState.CANCELLED, at=1.0, reason=reason)
                    for i in range(count)]

        def arrived(count: int) -> bool:
            return len(alice.events()) == count

        # Single changes, each sent before the next comes: at once, whatever flush_s.
        for n in range(1, 4):
            outbox.put(changes(1, f"e{n}"))
            wait_for(functools.partial(arrived, n), timeout=2,  # < flush_s
                     message="a single change at once")
        alice.messages.clear()
        outbox.put(changes(300, "a"))  # 300 at once: 128 + 128 + 44
        wait_for(lambda: len(alice.events()) == 300 and sum(feed) == 303, timeout=20,
                 message="300 events to alice and on the feed")
        assert [len(m) for m in alice.messages] == [128, 128, 44]
        assert feed == [1, 1, 1, 128, 128, 44]
        # Within flush_s of that send: the next puts wait, then go out together.
        outbox.put(changes(1, "b"))
        outbox.put(changes(2, "c"))
        wait_for(lambda: len(alice.events()) == 303, timeout=20, message="3 more")
        assert [len(m) for m in alice.messages][3:] == [3]
        # 40 events with 1 KiB reasons (~45 KB) over a 24 KB max_payload: in halves.
        outbox.flush_s = 0.0
        outbox.put(changes(40, "d", reason="x" * 1024))
        wait_for(lambda: len(alice.events()) == 343, timeout=20, message="40 long ones")
        sizes = [len(m) for m in alice.messages][4:]
        assert sum(sizes) == 40
        assert 1 < len(sizes) <= 4  # halves of halves at most
        assert [e.job for e in alice.events()][303:] == [c.job for c in changes(40, "d")]
    finally:
        outbox.stop()
    assert MAX_EVENTS_PER_MESSAGE == 128


def _events_payload(events: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"type": "job.events", "v": 1, "id": uuid.uuid4().hex, "ts": 1.0,
                       "events": events, **extra}).encode()


def test_malformed_job_events_are_refused_at_the_edge() -> None:
    one = {"job": "j-0123456789abcdef", "state": "running", "at": 1.0}
    body = decode(_events_payload([one])).body
    assert isinstance(body, JobEvents)
    assert body.each()[0].job == one["job"]
    for bad in (_events_payload([one] * (MAX_EVENTS_PER_MESSAGE + 1)),  # too many
                _events_payload([]),  # none
                _events_payload([{**one, "extra": "x"}]),  # an open object
                _events_payload([{**one, "reason": "x" * 1025}]),  # unbounded string
                _events_payload([{**one, "state": "exploded"}]),
                _events_payload([one], extra=1)):
        with pytest.raises(WireError):
            decode(bad)
    accepts = {"type": "client.accepts", "v": 1, "id": uuid.uuid4().hex, "ts": 1.0,
               "session": "s-1"}
    for types in (["job.events"] * 2, ["anything"], ["job.events"] * 9):
        with pytest.raises(WireError):
            decode(json.dumps({**accepts, "types": types}).encode())


def test_forged_job_events_from_another_principal_change_nothing(grid: GridHarness) -> None:
    """Another client's ``job.events`` into alice's inbox never reaches her watch or her
    futures (the broker's inbox ACL, and behind it the Grid's sender check)."""
    start_jobs_coordinator(grid)
    alice: Grid = grid.client("alice", "client")
    watch = alice.jobs.watch()
    forged = f"j-{uuid.uuid4().hex[:16]}"
    mallory = grid.bus("mallory", "client")
    mallory.send(grid.topics.client_inbox("alice"),
                 JobEvents(events=[{"job": forged, "state": "completed", "at": 1.0}]))
    reply = alice.ask(JobsSubmit(jobs=[{"command": "true"}]), what="submit")
    (job,) = reply.ids
    alice.ask(JobsCancel(jobs=[job]), what="cancel")
    seen: list[str] = []

    def real_one_came() -> bool:
        event = watch.get(timeout=0.2)
        if event is not None:
            seen.append(event.job)
        return job in seen

    wait_for(real_one_came, timeout=20, message="the real cancel event")
    assert forged not in seen  # (sent before the real one, on the same inbox)
    watch.close()
