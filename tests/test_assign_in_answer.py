"""The next assignments ride in the answer to a report (``attempt.recorded``; docs/jobs.md,
"Assignment in the report's answer"): the coordinator fills the slot a report freed at once
and carries the ``job.assign`` messages in its answer, to workers of agent 0.3 or later;
older agents get ``ok`` and a ``job.assign`` as before. The worker's side (the runner takes
the carried assignments) is in tests/test_job_runner.py."""

from __future__ import annotations

import threading
from typing import Any, cast

import pytest

from broker.bus import Incoming
from coordinator.job_state import AttemptKind
from coordinator.scheduler import agent_version
from schemas.codec import from_wire
from schemas.errors import WireError
from schemas.job_messages import ASSIGN_IN_ANSWER_BYTES, AttemptRecorded, JobAssign
from schemas.messages import Ok
from tests.fixtures.grid import COORDINATOR, GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import JobClient, JobWorker, start_jobs_coordinator
from worker.assign_answers import MAX_WAIT_S, HeldAnswers

pytestmark = [pytest.mark.integration]


def carried_assigns(w: JobWorker, reply: Any) -> list[JobAssign]:
    """Answer ``ok`` to each job.assign that ``reply`` (an attempt.recorded) carries, as the
    real worker does (worker/assign_answers.py), and return them."""
    assert isinstance(reply, AttemptRecorded)
    out: list[JobAssign] = []
    topic = w.topics.inbox_for(w.topics.worker_inbox(w.wid), COORDINATOR)
    for item in reply.assign or []:
        env = from_wire(item, topic=topic)
        assert isinstance(env.body, JobAssign)
        w.bus.reply(Incoming(topic, env, COORDINATOR), Ok())
        out.append(env.body)
    return out


def test_a_report_is_answered_with_the_next_assignment(grid: GridHarness) -> None:
    coordinator = start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = JobWorker(grid, "w1")
    w1.join(agent_version="0.3.0")
    ids = alice.submit({"command": "true"}, {"command": "true"}, {"command": "true"})
    (first,) = w1.assigned()  # the first, as a job.assign of its own (a pass)
    reply = w1.report_attempt(first.attempt, "success", exit_code=0)
    (second,) = carried_assigns(w1, reply)  # the next, in the answer to the report
    assert reply.recorded
    assert reply.counted
    wait_for(lambda: getattr(grid.store.get_attempt(second.attempt), "acked_at", None)
             is not None, 10, message="the carried assignment's ok recorded as its "
             "acknowledgement")
    reply = w1.report_attempt(second.attempt, "success", exit_code=0)
    (third,) = carried_assigns(w1, reply)
    assert sorted([first.job, second.job, third.job]) == sorted(ids)
    # no ok for the third: its report answers the assignment (a short job)
    reply = w1.report_attempt(third.attempt, "success", exit_code=0)
    assert carried_assigns(w1, reply) == []  # nothing left to carry: no assign
    assert len(w1.assigns) == 1  # every other one rode in an answer
    assert coordinator.scheduler.carried == 2
    for jid in ids:
        record = grid.store.get_job(jid)
        assert record is not None
        assert record.state.value == "completed"
    third_attempt = grid.store.get_attempt(third.attempt)
    assert third_attempt is not None
    assert third_attempt.acked_at is not None
    assert coordinator.scheduler._acks is not None
    assert coordinator.scheduler._acks.in_flight() == 0


def test_a_fill_reads_the_reporting_workers_rows_alone(
        grid: GridHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The assignment carried in a report's answer is matched against that worker alone:
    its row and its live attempts are read, not every online worker's (capabilities of
    up to 640 kB each) and every live attempt, on each report."""
    coordinator = start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1, w2 = JobWorker(grid, "w1"), JobWorker(grid, "w2")
    w1.join(agent_version="0.3.0", slots=1)
    w2.join(agent_version="0.3.0", slots=1)
    alice.submit(*[{"command": "true"}] * 4)
    (first,) = w1.assigned()
    w2.assigned()
    store = coordinator.scheduler.store
    asked: list[tuple[str, str]] = []  # (what, whose) asked on a thread but the passes'

    def spied(name: str) -> Any:
        real = getattr(store, name)

        def call(only: str | None = None) -> Any:
            if threading.current_thread().name != "job-scheduler":
                asked.append((name, str(only)))
            return real(only)
        return call

    for name in ("schedulable_workers", "attempt_usage"):
        monkeypatch.setattr(store, name, spied(name))
    (carried,) = carried_assigns(w1, w1.report_attempt(first.attempt, "success",
                                                       exit_code=0))
    assert sorted(asked) == [("attempt_usage", "w1"), ("schedulable_workers", "w1")]
    assert [w.id for w in store.schedulable_workers("w2")] == ["w2"]
    assert set(store.attempt_usage("w1")) == {"w1"}
    assert set(store.attempt_usage()) == {"w1", "w2"}
    assert carried.attempt != first.attempt


def test_a_fill_reads_first_only_as_many_jobs_as_the_freed_slots(
        grid: GridHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report that frees one slot reads one queued job (every row read is decoded, its
    spec and all), not ``candidates_per_slot`` of them; when that one does not match the
    worker, the full pages follow and a later job is carried."""
    coordinator = start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = JobWorker(grid, "w1")
    w1.join(agent_version="0.3.0", slots=1)
    alice.submit({"command": "true"})
    (first,) = w1.assigned()
    store = coordinator.scheduler.store
    pages: list[tuple[int, int]] = []  # (limit, offset) read on a thread but the passes'
    real = store.queued_jobs

    def spied(limit: int, offset: int = 0) -> Any:
        if threading.current_thread().name != "job-scheduler":
            pages.append((limit, offset))
        return real(limit, offset)

    monkeypatch.setattr(store, "queued_jobs", spied)
    queued = set(alice.submit({"command": "true"}, {"command": "true"}))
    (second,) = carried_assigns(w1, w1.report_attempt(first.attempt, "success",
                                                      exit_code=0))
    assert second.job in queued
    assert pages == [(1, 0)]
    pages.clear()
    # the head (a higher priority) asks for a tag w1 lacks: its one row, then a full
    # page after it, where the next job is
    elsewhere = alice.submit({"command": "true", "priority": 5,
                              "requirements": {"tags": ["gpu"]}})[0]
    (third,) = carried_assigns(w1, w1.report_attempt(second.attempt, "success",
                                                     exit_code=0))
    assert {second.job, third.job} == queued
    assert pages == [(1, 0), (4, 1)]
    job = grid.store.get_job(elsewhere)
    assert job is not None
    assert job.state.value == "queued"


def test_a_report_takes_one_pooled_connection(
        grid: GridHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's store calls (record it, announce, fill the slot) share one pool
    checkout: the hottest handler took one per call."""
    coordinator = start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = JobWorker(grid, "w1")
    w1.join(agent_version="0.3.0", slots=1)
    alice.submit(*[{"command": "true"}] * 3)
    (first,) = w1.assigned()
    # (the first report also looks the worker's role up: cached from then on)
    (second,) = carried_assigns(w1, w1.report_attempt(first.attempt, "success",
                                                      exit_code=0))
    db = coordinator.scheduler.store.db
    checkouts: list[str] = []
    real = db.connection_context

    def counted() -> Any:
        if threading.current_thread().name != "job-scheduler":  # (not a pass's)
            checkouts.append(threading.current_thread().name)
        return real()

    monkeypatch.setattr(db, "connection_context", counted)
    assert len(carried_assigns(w1, w1.report_attempt(second.attempt, "success",
                                                     exit_code=0))) == 1
    assert len([t for t in checkouts if t.endswith("-jobs")]) == 1  # (not acks' own)


def test_an_older_agent_gets_ok_and_a_job_assign(grid: GridHarness) -> None:
    coordinator = start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = JobWorker(grid, "w1")
    w1.join(agent_version="0.2.0")
    alice.submit({"command": "true"}, {"command": "true"})
    (first,) = w1.assigned()
    reply = w1.report_attempt(first.attempt, "success", exit_code=0)
    assert isinstance(reply, Ok)
    assert reply.detail == {"recorded": True, "counted": True}
    w1.assigned(2)  # the next came by a pass, as its own job.assign
    assert coordinator.scheduler.carried == 0


def test_an_assignment_too_big_to_carry_is_sent_alone(grid: GridHarness) -> None:
    coordinator = start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = JobWorker(grid, "w1")
    w1.join(agent_version="0.3.0")
    big = {f"V{i}": "x" * 4000 for i in range(ASSIGN_IN_ANSWER_BYTES // 4000 + 1)}
    alice.submit({"command": "true"})
    (first,) = w1.assigned()  # the slot is taken: the big one waits for its report
    (second,) = alice.submit({"command": "true", "env": big})
    reply = w1.report_attempt(first.attempt, "success", exit_code=0)
    assert carried_assigns(w1, reply) == []
    assigns = w1.assigned(2)
    assert assigns[1].job == second
    assert coordinator.scheduler.carried == 0


def test_agent_versions_are_read_leniently() -> None:
    assert agent_version({"agent_version": "0.3.0"}) == (0, 3)
    assert agent_version({"agent_version": "1.0"}) == (1, 0)
    assert agent_version({"agent_version": "2"}) == (2, 0)
    assert agent_version({"agent_version": "dev"}) == (0, 0)
    assert agent_version({}) == (0, 0)


def test_a_carried_message_of_another_type_is_refused() -> None:
    """The worker takes a carried item unvalidated only as the type its carrier's schema
    held it to (attempt.recorded's items are job.assign): anything else is refused."""
    body = {"type": "job.kill", "v": 1, "id": "m-1", "ts": 1.0, "attempt": "a-1",
            "reason": "x"}
    with pytest.raises(WireError):
        from_wire(body, carried_as=JobAssign.TYPE)
    assign = {"type": "job.assign", "v": 1, "id": "m-2", "ts": 1.0, "reply_to": "r/x",
              "attempt": "a-1", "job": "j-1", "owner": "alice", "spec": {"command": "true"},
              "inputs": [], "lease_s": 30.0}
    env = from_wire(assign, carried_as=JobAssign.TYPE)
    assert isinstance(env.body, JobAssign)
    assert env.id == "m-2"
    assert env.reply_to == "r/x"


def test_a_carried_assignment_never_answered_expires_and_is_offered_again(
        grid: GridHarness) -> None:
    """A worker that got the answer but never acknowledged (or reported) what it carried,
    as if the answer were lost: nothing is lost, the assignment expires after
    ``assign_ack_s`` and its job is offered again."""
    start_jobs_coordinator(grid, assign_ack_s=1.0)
    alice = JobClient(grid, "alice")
    w1 = JobWorker(grid, "w1")
    w1.join(agent_version="0.3.0")
    alice.submit({"command": "true"})
    (first,) = w1.assigned()
    (second,) = alice.submit({"command": "true"})  # waits for the slot
    reply = w1.report_attempt(first.attempt, "success", exit_code=0)
    assert isinstance(reply, AttemptRecorded)
    (item,) = reply.assign or []
    lost = from_wire(item, carried_as=JobAssign.TYPE).body
    assert isinstance(lost, JobAssign)
    assert lost.job == second
    wait_for(lambda: getattr(grid.store.get_attempt(lost.attempt), "kind", None)
             is AttemptKind.LEASE_EXPIRED, 10, message="the unanswered assignment expired")
    again = w1.assigned(2)[-1]  # offered again by a pass, as a job.assign of its own
    assert again.job == second
    assert again.attempt != lost.attempt


def test_the_held_ok_waits_at_most_a_second() -> None:
    """``job_ack_wait_s`` beyond 1 s would let the coordinator's ``assign_ack_s`` end
    attempts that run: it is used as 1 s (and a negative one as 0)."""
    def made(wait_s: float) -> HeldAnswers:
        return HeldAnswers(cast(Any, None), wait_s, cast(Any, None), durable=lambda: None,
                           offload=lambda call: call())

    assert made(60.0).wait_s == MAX_WAIT_S == 1.0
    assert made(-1.0).wait_s == 0.0
    assert made(0.1).wait_s == 0.1
