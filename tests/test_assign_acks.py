"""coordinator/assign_acks.py: ``job.assign`` answers handled on one thread.

The requests go through a stand-in for ``Bus.request_async`` (the futures are the test's
to settle, as the bus settles them when a reply arrives); the store is real. The whole
path over a real broker is in tests/test_jobs_coordinator.py (ghosts, busy, retries).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any, cast

import pytest

from coordinator.assign_acks import AssignAcks
from coordinator.job_state import AttemptKind
from coordinator.store import Store
from coordinator.store.job_records import AttemptRecord
from schemas.codec import Envelope, envelope
from schemas.job_messages import JobAssign
from schemas.messages import Error, Ok
from schemas.topics import Topics
from tests.fixtures.backends import BOTH_DBS


class Requests:
    """``request_async`` whose futures the test settles."""

    def __init__(self) -> None:
        self.sent: dict[str, Future[Envelope[Any]]] = {}

    def request_async(self, _inbox: str, body: JobAssign) -> Future[Envelope[Any]]:
        future: Future[Envelope[Any]] = Future()
        self.sent[body.attempt] = future
        return future


class QueuedIds:
    """The acks thread's queue of answered ids, with what was put in it kept."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.ids: list[str | None] = []

    def put(self, item: str | None) -> None:
        self.ids.append(item)
        self.inner.put(item)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Owner:
    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.refusals: list[tuple[str, str]] = []
        self.silent: list[str] = []
        self.event = threading.Event()

    def ack_deadline_s(self) -> float:
        return self.deadline_s

    def refused(self, attempt: AttemptRecord, error: Error) -> None:
        self.refusals.append((attempt.id, error.code))
        self.event.set()

    def unanswered(self, attempt: AttemptRecord) -> None:
        self.silent.append(attempt.id)
        self.event.set()


@pytest.fixture
def store(grid_db_url: str) -> Iterator[Store]:
    with Store.open(grid_db_url) as opened:
        yield opened


def _assigned(store: Store, count: int) -> list[AttemptRecord]:
    _batch, ids = store.submit_jobs("alice", [{"command": "true"}] * count, now=1000.0)
    out = []
    for jid in ids:
        made = store.assign_job(jid, "w1", now=1001.0)
        assert made is not None
        out.append(made[0])
    return out


def _body(attempt: AttemptRecord) -> JobAssign:
    return JobAssign(attempt=attempt.id, job=attempt.job_id, owner="alice",
                     spec={"command": "true"}, inputs=[], lease_s=60.0)


def _acked(store: Store, attempts: list[AttemptRecord]) -> list[bool]:
    return [cast(AttemptRecord, store.get_attempt(a.id)).acked_at is not None
            for a in attempts]


@BOTH_DBS
def test_answers_that_came_together_are_acknowledged_in_one_transaction(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    requests, owner = Requests(), Owner(deadline_s=60.0)
    calls: list[list[str]] = []
    real = store.acknowledge_attempts
    done = threading.Event()

    def counted(aids: list[str], **kw: Any) -> int:
        calls.append(list(aids))
        n = real(aids, **kw)
        if sum(len(c) for c in calls) >= 3:
            done.set()
        return n

    monkeypatch.setattr(store, "acknowledge_attempts", counted)
    acks = AssignAcks(cast(Any, requests), store, Topics("xc-acks"), owner)
    try:
        attempts = _assigned(store, 4)
        gate = threading.Event()  # hold the thread until all four answers are queued
        blocker = attempts[0]
        monkeypatch.setattr(acks, "_expire", lambda: gate.wait(10))
        for a in attempts:
            acks.send(a, _body(a))
        requests.sent[blocker.id].set_result(envelope(Ok()))
        for a in attempts[1:3]:
            requests.sent[a.id].set_result(envelope(Ok()))
        requests.sent[attempts[3].id].set_result(envelope(Error(code="busy", message="full")))
        gate.set()
        assert done.wait(10)
        assert owner.event.wait(10)
        assert owner.refusals == [(attempts[3].id, "busy")]
        assert sorted(a for c in calls for a in c) == sorted(a.id for a in attempts[:3])
        assert len(calls) <= 2  # the first answer alone at most, then the rest together
        assert _acked(store, attempts) == [True, True, True, False]
        assert acks.in_flight() == 0
    finally:
        acks.close()


def test_an_assignment_without_answer_ends_once_and_a_late_ok_changes_nothing(
        store: Store) -> None:
    requests, owner = Requests(), Owner(deadline_s=0.2)
    acks = AssignAcks(cast(Any, requests), store, Topics("xc-acks"), owner)
    try:
        (attempt,) = _assigned(store, 1)
        acks.send(attempt, _body(attempt))
        assert owner.event.wait(10)
        assert owner.silent == [attempt.id]
        future = requests.sent[attempt.id]
        assert future.cancelled()  # the bus forgets the request
        assert acks.in_flight() == 0
        assert _acked(store, [attempt]) == [False]
    finally:
        acks.close()
    assert owner.silent == [attempt.id]  # once


def test_a_shorter_deadline_sent_later_expires_first(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deadlines come from the setting at send time (it may be lowered meanwhile): one
    with a shorter deadline is not held behind an earlier, longer one."""
    requests, owner = Requests(), Owner(deadline_s=60.0)
    recorded = threading.Event()
    real = store.acknowledge_attempts

    def acknowledge(aids: list[str], **kw: Any) -> int:
        n = real(aids, **kw)
        recorded.set()
        return n

    monkeypatch.setattr(store, "acknowledge_attempts", acknowledge)
    acks = AssignAcks(cast(Any, requests), store, Topics("xc-acks"), owner)
    try:
        slow, quick = _assigned(store, 2)
        acks.send(slow, _body(slow))
        owner.deadline_s = 0.2
        acks.send(quick, _body(quick))
        assert owner.event.wait(10)
        assert owner.silent == [quick.id]
        assert acks.in_flight() == 1  # the slow one still waits for its answer
        requests.sent[slow.id].set_result(envelope(Ok()))
        assert recorded.wait(10)
        assert acks.in_flight() == 0
        assert _acked(store, [slow, quick]) == [True, False]
    finally:
        acks.close()


@BOTH_DBS
def test_an_accepted_report_answers_its_assignment(store: Store) -> None:
    """A worker holds its ok back briefly and a short job's report comes instead
    (worker/assign_answers.py): the report acknowledges the attempt, and its assignment no
    longer waits for an answer (no lease_expired, no job.kill at the deadline)."""
    requests, owner = Requests(), Owner(deadline_s=0.2)
    acks = AssignAcks(cast(Any, requests), store, Topics("xc-acks"), owner)
    queued = QueuedIds(acks._answered)
    acks._answered = cast(Any, queued)  # (its thread holds the queue itself: same queue)
    try:
        reported, silent = _assigned(store, 2)
        acks.send(reported, _body(reported))
        outcome = store.record_report(reported.id, "w1", AttemptKind.SUCCESS,
                                      outcome={"exit_code": 0}, stdout=None, stderr=None,
                                      outputs=[], started_at=1001.5, ended_at=1001.6,
                                      now=1002.0)
        assert outcome.recorded
        assert outcome.counted
        acks.reported(reported.id)
        assert requests.sent[reported.id].cancelled()  # the bus forgets the request
        assert reported.id not in queued.ids  # and nothing wakes the acks thread for it
        acks.send(silent, _body(silent))  # sent after: its deadline comes after the first's
        assert owner.event.wait(10)
        assert owner.silent == [silent.id]  # only the one that got neither ok nor report
        record = store.get_attempt(reported.id)
        assert record is not None
        assert record.acked_at == 1002.0  # acknowledged by its report
        assert record.kind is AttemptKind.SUCCESS
    finally:
        acks.close()
