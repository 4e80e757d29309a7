"""Job dependencies (docs/jobs.md, "Dependencies"): ``after`` keeps a job queued but out
of the scheduler's reach until its parents completed; a failed or cancelled parent holds
(or, by policy, cancels) its waiting children. Hand-driven workers (tests/job_actors.py),
a real coordinator, SQLite and MariaDB."""

from __future__ import annotations

import pytest

from coordinator.job_state import JobState
from coordinator.store import JobRecord
from schemas.errors import WireError
from schemas.job_messages import (
    JobsCancel,
    JobsList,
    JobsListReply,
    JobsRelease,
    JobsSubmit,
    JobsWhy,
    JobsWhyReply,
)
from schemas.messages import Error, Ok
from tests.fixtures.backends import BOTH_DBS
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import JobClient, JobWorker, start_jobs_coordinator

pytestmark = [pytest.mark.integration]


def job(grid: GridHarness, jid: str) -> JobRecord:
    record = grid.store.get_job(jid)
    assert record is not None
    return record


def wait_state(grid: GridHarness, jid: str, state: JobState) -> JobRecord:
    wait_for(lambda: job(grid, jid).state is state, 10,
             message=f"job {jid} {state.value} (is {job(grid, jid).state.value})")
    return job(grid, jid)


def assigned_jobs(w: JobWorker, count: int) -> list[str]:
    return [a.job for a in w.assigned(count)]


def attempt_for(w: JobWorker, jid: str) -> str:
    return next(a.attempt for a in w.assigns if a.job == jid)


def succeed(w: JobWorker, jid: str) -> None:
    reply = w.report_attempt(attempt_for(w, jid), "success", exit_code=0)
    assert isinstance(reply, Ok)
    assert reply.detail == {"recorded": True, "counted": True}


@BOTH_DBS
def test_a_diamond_runs_in_order_and_waiting_jobs_never_reach_a_worker(
        grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = JobWorker(grid, "w1")
    w1.join(slots=8)
    (a,) = alice.submit({"command": "a"})
    assert assigned_jobs(w1, 1) == [a]
    (b, c) = alice.submit({"command": "b", "after": [a]}, {"command": "c", "after": [a]})
    (d,) = alice.submit({"command": "d", "after": [b, c]})
    (e,) = alice.submit({"command": "e"})  # submitted last, runs first: a slot is free
    assert assigned_jobs(w1, 2) == [a, e]
    assert job(grid, b).state is JobState.QUEUED
    assert job(grid, b).waiting == 1
    assert job(grid, d).waiting == 2
    listing = alice.request(JobsList(state="queued"))
    assert isinstance(listing, JobsListReply)
    assert {j["id"]: j["hold_reason"] for j in listing.jobs} == {
        b: "waiting for 1 parent job(s)", c: "waiting for 1 parent job(s)",
        d: "waiting for 2 parent job(s)"}
    why = alice.request(JobsWhy(job=d))
    assert isinstance(why, JobsWhyReply)
    assert "waiting for 2 parent job(s)" in why.verdict
    succeed(w1, a)
    assert set(assigned_jobs(w1, 4)[2:]) == {b, c}
    succeed(w1, b)
    (f,) = alice.submit({"command": "f"})  # a pass after b's success: d still waits
    assert assigned_jobs(w1, 5)[4] == f
    assert d not in [x.job for x in w1.assigns]
    assert job(grid, d).waiting == 1
    succeed(w1, c)
    assert assigned_jobs(w1, 6)[5] == d
    succeed(w1, d)
    wait_state(grid, d, JobState.COMPLETED)
    assert [x.job for x in w1.assigns].count(d) == 1


@BOTH_DBS
def test_a_failed_parent_holds_or_cancels_its_children(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = JobWorker(grid, "w1")
    w1.join(slots=4)
    (p,) = alice.submit({"command": "p"})
    assert assigned_jobs(w1, 1) == [p]
    (held, cancelled) = alice.submit({"command": "h", "after": [p]},
                                     {"command": "k", "after": [p], "after_policy": "cancel"})
    (grandchild,) = alice.submit({"command": "g", "after": [held]})
    reply = w1.report_attempt(attempt_for(w1, p), "exit_nonzero", exit_code=1)
    assert isinstance(reply, Ok)
    wait_state(grid, p, JobState.FAILED)
    h = wait_state(grid, held, JobState.HELD)
    assert h.hold_code == "dependency"
    assert h.hold_reason is not None
    assert p in h.hold_reason
    assert "failed" in h.hold_reason
    wait_state(grid, cancelled, JobState.CANCELLED)
    assert job(grid, grandchild).state is JobState.QUEUED  # its parent is held, not ended
    wait_for(lambda: alice.states_of(held) == ["held"]
             and alice.states_of(cancelled) == ["cancelled"], 10,
             message="alice told of the held and the cancelled child")
    # A child submitted after its parent failed is held at once.
    (late,) = alice.submit({"command": "late", "after": [p]})
    assert job(grid, late).state is JobState.HELD
    assert job(grid, late).hold_code == "dependency"
    # Released, it is queued again but still waits for the parent that never completes.
    assert isinstance(alice.request(JobsRelease(jobs=[held])), Ok)
    released = wait_state(grid, held, JobState.QUEUED)
    assert released.waiting == 1
    why = alice.request(JobsWhy(job=held))
    assert isinstance(why, JobsWhyReply)
    assert "waiting for 1 parent job(s)" in why.verdict
    # Cancelling a parent holds its children too; a free slot shows none was assigned.
    (q,) = alice.submit({"command": "q", "requirements": {"worker": "nobody"}})
    (child,) = alice.submit({"command": "child", "after": [q]})
    assert isinstance(alice.request(JobsCancel(jobs=[q])), Ok)
    assert job(grid, child).state is JobState.HELD
    (last,) = alice.submit({"command": "last"})
    assert assigned_jobs(w1, 2)[1] == last
    assert {x.job for x in w1.assigns} == {p, last}


@BOTH_DBS
def test_parents_must_exist_and_be_the_submitters_own(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    grid.add_principals(("bob", "client"))
    alice = JobClient(grid, "alice")
    bob = JobClient(grid, "bob")
    (mine,) = alice.submit({"command": "true", "requirements": {"worker": "nobody"}})
    theirs = bob.request(JobsSubmit(jobs=[{"command": "x", "after": [mine]}]))
    assert isinstance(theirs, Error)
    assert theirs.code == "not_found"
    assert "no job" in theirs.message
    missing = alice.request(JobsSubmit(jobs=[{"command": "x", "after": ["j-0000000000000000"]}]))
    assert isinstance(missing, Error)
    assert missing.code == "not_found"
    # A job cannot name itself (its id is chosen at submit) nor a job of its own batch:
    # ids not yet given are not found, so no cycle can be built.
    for bad in ({"after": [mine, mine]}, {"after": [mine], "after_policy": "ignore"},
                {"after": [f"j-{i:016x}" for i in range(65)]}):
        with pytest.raises(WireError, match="invalid"):  # the schema refuses it
            alice.request(JobsSubmit(jobs=[{"command": "x", **bad}]))
    # Nothing was inserted by the refused submits.
    jobs, _ = grid.store.list_jobs(owner=None)
    assert [j.id for j in jobs] == [mine]
    # An admin may name anyone's job.
    (admins,) = JobClient(grid, "boss", "admin").submit({"command": "x", "after": [mine]})
    assert job(grid, admins).waiting == 1


@BOTH_DBS
def test_future_inputs_become_the_parents_result_refs(grid: GridHarness) -> None:
    """An input ``{name, job, output}`` (docs/jobs.md, "Futures as inputs") joins
    ``after`` and is a plain data ref by the time the worker gets the job; a missing
    output holds the child (code input); a parent completed already resolves too."""
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = JobWorker(grid, "w1")
    w1.join(slots=8)
    (p,) = alice.submit({"command": "p", "outputs": ["*.txt"]})
    assert assigned_jobs(w1, 1) == [p]
    (child, missing) = alice.submit(
        {"command": "c", "inputs": [{"name": "in", "job": p, "output": "o.txt"},
                                    {"name": "log", "job": p, "output": "stdout"}]},
        {"command": "m", "inputs": [{"name": "x", "job": p, "output": "nope.txt"}]})
    assert job(grid, child).spec["after"] == [p]
    assert job(grid, child).waiting == 1
    out, log = "a" * 64, "b" * 64
    reply = w1.report_attempt(attempt_for(w1, p), "success", exit_code=0,
                              stdout={"sha256": log, "size": 3},
                              outputs=[{"name": "o.txt", "sha256": out, "size": 5}])
    assert isinstance(reply, Ok)
    body = next(a for a in w1.assigned(2) if a.job == child)
    assert [(i["name"], i["sha256"]) for i in body.inputs] == [("in", out), ("log", log)]
    assert job(grid, child).spec["inputs"] == [{"name": "in", "sha256": out},
                                              {"name": "log", "sha256": log}]
    held = wait_state(grid, missing, JobState.HELD)
    assert held.hold_code == "input"
    assert held.hold_reason is not None
    assert "input_missing" in held.hold_reason
    assert "nope.txt" in held.hold_reason
    assert missing not in [a.job for a in w1.assigns]
    # The parent has completed: a new child resolves at once (a workflow's rescue).
    (late,) = alice.submit({"command": "l", "inputs": [{"name": "i", "job": p,
                                                        "output": "o.txt"}]})
    body = next(a for a in w1.assigned(3) if a.job == late)
    assert [(i["name"], i["sha256"]) for i in body.inputs] == [("i", out)]
    # Someone else's job cannot be a future input.
    grid.add_principals(("bob", "client"))
    bob = JobClient(grid, "bob")
    theirs = bob.request(JobsSubmit(jobs=[{"command": "x", "inputs": [
        {"name": "i", "job": p, "output": "o.txt"}]}]))
    assert isinstance(theirs, Error)
    assert theirs.code == "not_found"
