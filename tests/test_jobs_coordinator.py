"""Batch jobs at the coordinator (docs/jobs.md): submit, schedule, assign, acknowledge,
report, retry, requeue, cancel, hold, release; forged messages change nothing. Workers
are hand-driven (tests/job_actors.py) on both brokers; the store on SQLite, and MariaDB
where marked. The worker's runner and the client are tested elsewhere (J2)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from broker.transfer import Offer, TransferRefused
from coordinator.job_state import (
    ATTEMPT_MACHINE,
    JOB_MACHINE,
    TERMINAL,
    AttemptKind,
    JobState,
    Verdict,
    verdict,
)
from coordinator.store import AttemptRecord, JobRecord
from schemas.job_messages import (
    AttemptReport,
    JobsCancel,
    JobsHold,
    JobsList,
    JobsListReply,
    JobsRelease,
    JobsShow,
    JobsShowReply,
    JobsSubmit,
)
from schemas.messages import Error, Ok
from tests.fixtures.backends import BOTH_DBS
from tests.fixtures.coordinator_process import CoordinatorProcess
from tests.fixtures.grid import LIVENESS_FACTOR, GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import JobClient, JobWorker, start_jobs_coordinator

pytestmark = [pytest.mark.integration]

SHA = "ab" * 32


def job(grid: GridHarness, jid: str) -> JobRecord:
    record = grid.store.get_job(jid)
    assert record is not None
    return record


def wait_state(grid: GridHarness, jid: str, state: JobState, timeout: float = 10.0
               ) -> JobRecord:
    wait_for(lambda: job(grid, jid).state is state, timeout,
             message=f"job {jid} {state.value} (is {job(grid, jid).state.value})")
    return job(grid, jid)


def attempt_of(grid: GridHarness, aid: str) -> AttemptRecord:
    record = grid.store.get_attempt(aid)
    assert record is not None
    return record


def kinds(grid: GridHarness, jid: str) -> list[str]:
    return [a.kind.value for a in grid.store.job_attempts(jid)[0]]


def worker(grid: GridHarness, wid: str, **caps: object) -> JobWorker:
    w = JobWorker(grid, wid)
    w.join(**caps)
    return w


@BOTH_DBS
def test_submit_assign_start_report_completes_once(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = worker(grid, "w1")
    (jid,) = alice.submit({"command": "echo hi", "name": "hello", "labels": {"a": "b"}})
    (assign,) = w1.assigned()
    assert assign.job == jid
    assert assign.owner == "alice"
    assert assign.spec["command"] == "echo hi"
    assert assign.inputs == []
    assert assign.attempt.startswith("a-")
    assert jid.startswith("j-")
    wait_for(lambda: attempt_of(grid, assign.attempt).acked_at is not None, 10,
             message="the ok recorded as the acknowledgement")
    assert isinstance(w1.started(assign.attempt), Ok)
    reply = w1.report_attempt(assign.attempt, "success", exit_code=0, duration_s=0.5,
                              stdout={"sha256": SHA, "size": 3}, started_at=1.0, ended_at=2.0)
    assert isinstance(reply, Ok)
    assert reply.detail == {"recorded": True, "counted": True}
    done = job(grid, jid)
    assert done.state is JobState.COMPLETED
    assert done.exit_code == 0
    assert grid.store.result_count(jid) == (1, 1)
    wait_for(lambda: alice.states_of(jid) == ["running", "completed"], 10,
             message="alice told running then completed")
    show = alice.request(JobsShow(job=jid))
    assert isinstance(show, JobsShowReply)
    assert show.job["state"] == "completed"
    assert show.job["spec"]["name"] == "hello"
    assert show.job["results"]["stdout"] == {"sha256": SHA, "size": 3}
    assert [a["kind"] for a in show.attempts] == ["success"]
    listing = alice.request(JobsList(state="completed"))
    assert isinstance(listing, JobsListReply)
    assert [j["id"] for j in listing.jobs] == [jid]
    assert listing.more is False


def test_retry_budgets_are_exact_and_stop_codes_stop(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = worker(grid, "w1", slots=1)
    w1.auto = True
    w1.exit_code = 1
    (always,) = alice.submit({"command": "false", "max_retries": 2})
    wait_state(grid, always, JobState.FAILED)
    assert kinds(grid, always) == ["exit_nonzero"] * 3, "exactly 1 + N attempts"
    assert job(grid, always).job_failures == 3
    w1.exit_code = 3
    (stopped,) = alice.submit({"command": "exit 3", "max_retries": 5,
                               "stop_exit_codes": [3]})
    wait_state(grid, stopped, JobState.FAILED)
    assert kinds(grid, stopped) == ["exit_nonzero"]
    # System failures spend the other budget: an assignment never acknowledged.
    w1.auto = False
    w1.assign_mode = "silent"
    grid.coordinator.scheduler.config.assign_ack_s = 0.3  # type: ignore[union-attr]
    (ghost,) = alice.submit({"command": "true", "max_system_retries": 1})
    wait_state(grid, ghost, JobState.FAILED)
    assert kinds(grid, ghost) == ["lease_expired"] * 2
    assert len(w1.assigns) == 3 + 1 + 2


def test_an_unacknowledged_assignment_goes_elsewhere(grid: GridHarness) -> None:
    start_jobs_coordinator(grid, assign_ack_s=0.5)
    alice = JobClient(grid, "alice")
    silent = worker(grid, "silent")
    silent.assign_mode = "silent"
    (jid,) = alice.submit({"command": "true"})
    (first,) = silent.assigned()
    healthy = worker(grid, "healthy", slots=2)  # more free slots: preferred
    healthy.auto = True
    done = wait_state(grid, jid, JobState.COMPLETED)
    assert kinds(grid, jid) == ["lease_expired", "success"]
    assert done.worker == "healthy"
    assert done.system_failures == 1
    wait_for(lambda: silent.killed(first.attempt), 10, message="the ghost told to stop")
    # Its ok arriving late changes nothing.
    assert grid.store.acknowledge_attempt(first.attempt) is False


def test_a_lost_workers_job_is_requeued_and_ends_once(grid: GridHarness) -> None:
    coordinator = start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    doomed = worker(grid, "doomed")
    (jid,) = alice.submit({"command": "sleep 100"})
    (assign,) = doomed.assigned()
    assert isinstance(doomed.started(assign.attempt), Ok)
    backup = worker(grid, "backup")
    backup.auto = True
    lost_at = time.monotonic()
    doomed.crash()  # its last will: lost after will_confirm_s of silence
    done = wait_state(grid, jid, JobState.COMPLETED)
    took = time.monotonic() - lost_at
    deadline = coordinator.config.coordinator.will_confirm_s + 3.0
    assert took < deadline, f"requeued in {took:.1f}s"
    assert kinds(grid, jid) == ["worker_lost", "success"]
    assert done.worker == "backup"
    assert done.system_failures == 1
    # The lost worker's late report is recorded and ignored.
    reply = doomed.report_attempt(assign.attempt, "success", exit_code=0)
    assert isinstance(reply, Ok)
    assert reply.detail == {"recorded": True, "counted": False}
    assert grid.store.result_count(jid) == (1, 2)
    assert job(grid, jid).state is JobState.COMPLETED
    terminal = [s for s in alice.states_of(jid) if JobState(s) in TERMINAL]
    wait_for(lambda: [s for s in alice.states_of(jid) if JobState(s) in TERMINAL]
             == ["completed"], 5, message="one terminal event")
    assert terminal in ([], ["completed"])


@BOTH_DBS
def test_duplicate_and_forged_reports_change_nothing(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    grid.add_principals(("bob", "client"))
    alice = JobClient(grid, "alice")
    bob = JobClient(grid, "bob")
    w1 = worker(grid, "w1")
    w2 = worker(grid, "w2")
    (jid,) = alice.submit({"command": "true", "requirements": {"worker": "w1"}})
    (assign,) = w1.assigned()
    # Another worker reports w1's attempt; a client reports; bob cancels alice's job.
    forged = w2.report_attempt(assign.attempt, "success", exit_code=0)
    assert isinstance(forged, Error)
    assert forged.code == "not_found"
    assert isinstance(w2.started(assign.attempt), Error)
    sneaky = bob.request(AttemptReport(attempt=assign.attempt, kind="success"))
    assert isinstance(sneaky, Error)
    assert sneaky.code == "forbidden"
    cancel = bob.request(JobsCancel(jobs=[jid]))
    assert isinstance(cancel, Ok)
    assert cancel.detail == {"changed": 0, "unchanged": 0,
                                                        "unknown": 1}
    assert isinstance(bob.request(JobsShow(job=jid)), Error)
    assert bob.request(JobsList()).jobs == []
    assert job(grid, jid).state is JobState.RUNNING
    assert grid.store.result_count(jid) == (0, 0)
    # The real report, twice: recorded once.
    first = w1.report_attempt(assign.attempt, "exit_nonzero", exit_code=2)
    again = w1.report_attempt(assign.attempt, "exit_nonzero", exit_code=2)
    assert isinstance(first, Ok)
    assert first.detail == {"recorded": True, "counted": True}
    assert isinstance(again, Ok)
    assert again.detail == {"recorded": False, "counted": False}
    assert grid.store.result_count(jid) == (1, 1)
    failed = job(grid, jid)
    assert failed.state is JobState.FAILED
    assert failed.exit_code == 2


def test_cancel_hold_and_release(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    # Queued (no worker matches): hold, release, cancel.
    (waiting,) = alice.submit({"command": "true", "requirements": {"tags": ["gpu"]}})
    held = alice.request(JobsHold(jobs=[waiting], reason="not yet"))
    assert isinstance(held, Ok)
    assert held.detail == {"changed": 1, "unchanged": 0,
                                                    "unknown": 0}
    record = job(grid, waiting)
    assert record.state is JobState.HELD
    assert record.hold_reason == "not yet"
    assert record.hold_code == "user"
    assert alice.request(JobsHold(jobs=[waiting])).detail["unchanged"] == 1
    assert alice.request(JobsRelease(jobs=[waiting])).detail["changed"] == 1
    assert job(grid, waiting).state is JobState.QUEUED
    assert alice.request(JobsCancel(jobs=[waiting, "j-0000000000000000"])).detail == {
        "changed": 1, "unchanged": 0, "unknown": 1}
    assert job(grid, waiting).state is JobState.CANCELLED
    assert alice.request(JobsRelease(jobs=[waiting])).detail["unchanged"] == 1
    # Running: cancel kills the attempt; its late report is stale.
    w1 = worker(grid, "w1")
    (running,) = alice.submit({"command": "sleep 100"})
    (assign,) = w1.assigned()
    wait_state(grid, running, JobState.RUNNING)
    assert alice.request(JobsCancel(jobs=[running])).detail["changed"] == 1
    wait_for(lambda: w1.killed(assign.attempt), 10, message="job.kill sent")
    late = w1.report_attempt(assign.attempt, "cancelled", signal=15)
    assert isinstance(late, Ok)
    assert late.detail == {"recorded": True, "counted": False}
    assert job(grid, running).state is JobState.CANCELLED
    wait_for(lambda: alice.states_of(running) == ["running", "cancelled"], 10,
             message="events running, cancelled")
    # Held while running: back in the queue on release, and runs again.
    (again,) = alice.submit({"command": "sleep 1"})
    (_, second) = w1.assigned(2)
    wait_state(grid, again, JobState.RUNNING)
    assert alice.request(JobsHold(jobs=[again])).detail["changed"] == 1
    wait_for(lambda: w1.killed(second.attempt), 10, message="held job's attempt killed")
    w1.auto = True
    alice.request(JobsRelease(jobs=[again]))
    wait_state(grid, again, JobState.COMPLETED)
    assert kinds(grid, again) == ["cancelled", "success"]


def test_heartbeats_reconcile_attempts_both_ways(grid: GridHarness) -> None:
    start_jobs_coordinator(grid, missed_heartbeats=2)
    alice = JobClient(grid, "alice")
    w1 = worker(grid, "w1")
    (jid,) = alice.submit({"command": "sleep 100", "max_system_retries": 0})
    (assign,) = w1.assigned()
    wait_for(lambda: attempt_of(grid, assign.attempt).acked_at is not None, 10,
             message="acknowledged")
    time.sleep(1.1)  # past the reconciliation grace of a fresh acknowledgement
    w1.heartbeat_attempts(1, [assign.attempt])
    w1.heartbeat_attempts(2, [])
    wait_for(lambda: attempt_of(grid, assign.attempt).missing == 1, 10,
             message="one heartbeat without it")
    assert job(grid, jid).state is JobState.RUNNING
    w1.heartbeat_attempts(3, [])
    failed = wait_state(grid, jid, JobState.FAILED)
    assert kinds(grid, jid) == ["lease_expired"]
    assert failed.system_failures == 1
    # An attempt the worker runs that is not current there: killed.
    ghost = "a-00000000deadbeef"
    w1.heartbeat_attempts(4, [ghost])
    wait_for(lambda: w1.killed(ghost), 10, message="the unknown attempt killed")
    w1.heartbeat_attempts(5, [assign.attempt])
    wait_for(lambda: w1.killed(assign.attempt), 10, message="the ended attempt killed")


def test_workers_read_inputs_and_store_results_of_their_attempts(grid: GridHarness) -> None:
    coordinator = start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    grid.add_principals(("bob", "client"))
    bob = JobClient(grid, "bob")
    grid.store.put_data("alice", "in.txt", SHA, 3)
    w1 = worker(grid, "w1")
    refused = bob.request(JobsSubmit(jobs=[{"command": "cat", "stdin": SHA}]))
    assert isinstance(refused, Error)
    assert refused.code == "forbidden"
    (jid,) = alice.submit({"command": "cat x", "inputs": [{"name": "x", "sha256": SHA}]})
    (assign,) = w1.assigned()
    assert assign.inputs == [{"name": "x", "sha256": SHA, "size": 3}]
    assert ("job", jid, "alice") in grid.store.data_refs(SHA)
    source = coordinator.data.source
    assert source.worker_may_read("w1", SHA)
    assert not source.worker_may_read("w2", SHA)
    assert grid.store.attempt_grant(assign.attempt, "w1") == (jid, "alice")
    assert grid.store.attempt_grant(assign.attempt, "w2") is None
    w1.report_attempt(assign.attempt, "success", exit_code=0)
    assert not source.worker_may_read("w1", SHA)
    assert grid.store.attempt_grant(assign.attempt, "w1") is None


@BOTH_DBS
def test_a_coordinator_killed_with_jobs_queued_and_running_loses_none(
        grid: GridHarness) -> None:
    """SIGKILL the coordinator process with jobs queued and running; a report sent while
    it is down is delivered after the restart; every job ends in exactly one terminal
    state with one counted result."""
    process = CoordinatorProcess(grid)
    process.env.update(XCLOUD_JOBS_PASS_S="0.2", XCLOUD_JOBS_ASSIGN_ACK_S="5")
    try:
        process.start()
        alice = JobClient(grid, "alice")
        w1 = worker(grid, "w1", slots=2)
        ids = alice.submit(*({"command": f"echo {i}", "index": i} for i in range(6)))
        first, second = w1.assigned(2)
        wait_for(lambda: all(attempt_of(grid, a.attempt).acked_at
                             for a in (first, second)), 10, message="both acknowledged")
        assert isinstance(w1.started(first.attempt), Ok)
        process.kill()
        # Finished while the coordinator is down: re-sent until answered.
        late = threading.Thread(target=w1.request, args=(AttemptReport(
            attempt=first.attempt, kind="success", exit_code=0),), kwargs={"retry": True},
            daemon=True)
        late.start()
        assert {job(grid, j).state for j in ids} == {JobState.RUNNING, JobState.QUEUED}
        w1.auto = True
        process.start()
        late.join(30)
        assert not late.is_alive(), "the report was answered after the restart"
        assert isinstance(w1.report_attempt(second.attempt, "success", exit_code=0), Ok)
        wait_for(lambda: all(job(grid, j).state is JobState.COMPLETED for j in ids), 30,
                 message="every job completed")
        for jid in ids:
            assert grid.store.result_count(jid) == (1, 1), jid
            assert kinds(grid, jid) == ["success"], jid
    finally:
        process.stop()


@pytest.mark.parametrize(("section", "machine"), [("## Jobs", "job"), ("## Attempts", "attempt")])
def test_documented_diagrams_match_the_tables(section: str, machine: str) -> None:
    """docs/state-machines.md draws exactly the tables' edges, each with a cause."""
    table = JOB_MACHINE if machine == "job" else ATTEMPT_MACHINE
    text = (Path(__file__).resolve().parent.parent / "docs" / "state-machines.md").read_text()
    part = text.split(f"\n{section}\n", 1)[1].split("\n## ", 1)[0]
    edges = re.findall(r"^\s*(\w+)\s*-->\s*(\w+)\s*:\s*(\S.*)$", part, re.MULTILINE)
    drawn = {(a, b) for a, b, _cause in edges}
    assert drawn == {(a.value, b.value) for a, b in table.edges}


def test_verdicts_spend_the_right_budget() -> None:
    def fate(kind: AttemptKind, code: int | None = None, *, system: int = 0,
             retries: int = 0, stop: frozenset[int] = frozenset()) -> Verdict:
        return verdict(kind, code, system_failures=system, job_failures=0,
                       max_system_retries=1, max_retries=retries, stop_exit_codes=stop)

    assert fate(AttemptKind.WORKER_LOST).state is JobState.QUEUED
    assert fate(AttemptKind.INPUT_FAILED, system=1).state is JobState.FAILED
    assert fate(AttemptKind.OOM).spent == "job"
    assert fate(AttemptKind.EXIT_NONZERO, 1, retries=3, stop=frozenset({1})).state \
        is JobState.FAILED
    assert fate(AttemptKind.EXIT_NONZERO, 2, retries=3).state is JobState.QUEUED
    assert fate(AttemptKind.SUCCESS, 0).state is JobState.COMPLETED
    with pytest.raises(ValueError, match="does not end"):
        fate(AttemptKind.RUNNING)


def test_a_worker_uploads_results_only_for_its_live_attempts(grid: GridHarness) -> None:
    """DataSink.admit: grant = a live attempt of the uploading worker, owner = the job's
    owner, name = <job>/stdout|stderr|outputs/NAME; anything else is refused."""
    coordinator = start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    grid.add_principals(("w2", "worker"))
    w1 = worker(grid, "w1")
    (jid,) = alice.submit({"command": "true"})
    (assign,) = w1.assigned()
    sink = coordinator.data.sink

    def offer(peer: str, **purpose: object) -> str:
        body = {"kind": "data", "owner": "alice", "name": f"{jid}/stdout",
                "grant": assign.attempt, **purpose}
        try:
            sink.admit(Offer(peer=peer, tid=f"t-{peer}-{len(purpose)}", direction="in",
                             name="stdout", size=5, sha256="cd" * 32, segment_size=65536,
                             purpose=body))
        except TransferRefused as err:
            return err.code
        return "admitted"

    assert offer("w1") == "admitted"
    assert offer("w1", name=f"{jid}/outputs/a.txt") == "admitted"
    assert offer("w2") == "forbidden", "another worker"
    assert offer("w1", owner="bob") == "forbidden", "another owner"
    assert offer("w1", name="elsewhere") == "forbidden", "another name"
    assert offer("w1", grant="a-0000000000000000") == "forbidden", "another attempt"
    w1.report_attempt(assign.attempt, "success", exit_code=0)
    assert offer("w1") == "forbidden", "the attempt is over"


def test_a_silent_workers_job_is_requeued_within_the_liveness_deadline(
        grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    interval = 0.3
    silent = worker(grid, "silent", heartbeat_s=interval)
    stop = threading.Event()

    def beat() -> None:
        seq = 0
        while not stop.wait(interval / 3):
            seq += 1
            silent.heartbeat(seq, interval_s=interval,
                             attempts=[a.attempt for a in list(silent.assigns)])

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        (jid,) = alice.submit({"command": "sleep 100"})
        (assign,) = silent.assigned()
        wait_for(lambda: attempt_of(grid, assign.attempt).acked_at is not None, 10,
                 message="acknowledged")
        backup = worker(grid, "backup")
        backup.auto = True
    finally:
        stop.set()
        beating.join(5)
    silent_since = time.monotonic()
    done = wait_state(grid, jid, JobState.COMPLETED)
    took = time.monotonic() - silent_since
    assert took < LIVENESS_FACTOR * interval + 2.0, f"requeued {took:.1f}s after silence"
    assert kinds(grid, jid) == ["worker_lost", "success"]
    assert done.worker == "backup"


def test_listing_pages_with_a_cursor_and_admins_see_all(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    admin = JobClient(grid, "boss", "admin")
    ids = alice.submit(*({"command": "true", "requirements": {"os": "plan9"}}
                         for _ in range(5)))
    seen: list[str] = []
    after: str | None = None
    while True:
        page = alice.request(JobsList(limit=2, after=after))
        assert isinstance(page, JobsListReply)
        seen += [j["id"] for j in page.jobs]
        if not page.more:
            break
        after = page.jobs[-1]["id"]
    assert sorted(seen) == sorted(ids)
    assert len(seen) == 5
    everyone = admin.request(JobsList(owner="alice", state="queued"))
    assert len(everyone.jobs) == 5
    assert admin.request(JobsList()).jobs != []
    refused = alice.request(JobsList(owner="boss"))
    assert isinstance(refused, Error)
    assert refused.code == "forbidden"


def test_a_report_gives_a_short_attempt_its_start(grid: GridHarness) -> None:
    """A command that ends within 0.25 s sends no attempt.started: the report's
    started_at becomes the attempt's (job show's timeline, the dashboard)."""
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = worker(grid, "w1")
    alice.submit({"command": "true"})
    (assign,) = w1.assigned()
    assert isinstance(w1.report_attempt(assign.attempt, "success", exit_code=0,
                                        started_at=1.5, ended_at=2.0), Ok)
    assert attempt_of(grid, assign.attempt).started_at == 1.5


def test_an_auto_workers_report_thread_ends_quietly_when_its_bus_stops(
        grid: GridHarness) -> None:
    """(tests/job_actors.py) An ``auto`` fake worker's report thread that outlives its
    test, its bus stopped by the harness while the report waits for an answer, ends
    without an error: it raised "bus stopped" into whichever test ran next
    (PytestUnhandledThreadExceptionWarning in CI)."""
    w = JobWorker(grid, "w1")  # no coordinator: the request waits for an answer
    failures: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            w._auto_finish("a-0123456789abcdef")
        except BaseException as err:
            failures.append(err)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    wait_for(lambda: bool(w.bus._pending), 10, message="the attempt.started under way")
    w.bus.stop()
    assert done.wait(10), "the thread still runs"
    assert failures == []
