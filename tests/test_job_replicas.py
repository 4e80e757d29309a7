"""Replicated jobs with a quorum, and worker trust (docs/jobs.md, "Replicas and quorum").

Hand-driven workers (tests/job_actors.py) report the stdout hash each test wants, so a
liar is a worker whose hash differs. The coordinator and the store are real (both
brokers' default, SQLite and MariaDB where marked). Which workers are online decides
where replicas go: a worker joins only when the test wants it to take the next one.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from client.api import WorkerInfo
from client.table import worker_detail
from coordinator.job_replicas import Vote, decide, max_attempts
from coordinator.job_state import AttemptKind, JobState
from coordinator.store import JobRecord
from schemas.errors import WireError
from schemas.job_messages import (
    AttemptReport,
    AttemptStarted,
    JobsCancel,
    JobsHold,
    JobsRelease,
    JobsShow,
    JobsShowReply,
    JobsSubmit,
    JobsWhy,
    JobsWhyReply,
)
from schemas.messages import Error, Ok, WorkersShow, WorkersShowReply
from tests.fixtures.backends import BOTH_DBS
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import JobClient, JobWorker, start_jobs_coordinator

pytestmark = [pytest.mark.integration]

HONEST = "ab" * 32
LIE = "cd" * 32


class Replier(JobWorker):
    """A worker that reports success with stdout of hash ``sha`` (a liar's differs)."""

    def __init__(self, grid: GridHarness, wid: str, sha: str = HONEST) -> None:
        super().__init__(grid, wid)
        self.sha = sha
        self.auto = True

    def _finish(self, aid: str) -> None:
        self.request(AttemptStarted(attempt=aid), retry=True)
        self.request(AttemptReport(attempt=aid, kind="success", exit_code=0, duration_s=0.01,
                                   stdout={"sha256": self.sha, "size": 3}), retry=True)


def replier(grid: GridHarness, wid: str, sha: str = HONEST, **caps: object) -> Replier:
    w = Replier(grid, wid, sha)
    w.join(**caps)
    return w


def job(grid: GridHarness, jid: str) -> JobRecord:
    record = grid.store.get_job(jid)
    assert record is not None
    return record


def wait_state(grid: GridHarness, jid: str, state: JobState, timeout: float = 15.0
               ) -> JobRecord:
    wait_for(lambda: job(grid, jid).state is state, timeout,
             message=f"job {jid} {state.value} (is {job(grid, jid).state.value})")
    return job(grid, jid)


def results(grid: GridHarness, jid: str, count: int) -> None:
    wait_for(lambda: grid.store.result_count(jid)[1] >= count, 15,
             message=f"{count} results of {jid}")


def attempts(grid: GridHarness, jid: str) -> list[tuple[str, str]]:
    """(worker, kind) of each attempt, oldest first."""
    return [(a.worker_id, a.kind.value) for a in grid.store.job_attempts(jid)[0]]


def replicated(grid: GridHarness, workers: int, spec: dict[str, object]
               ) -> tuple[JobClient, list[JobWorker], str]:
    """A coordinator, ``workers`` scripted workers online, alice's job ``spec``, and each
    worker holding one of its replicas."""
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    pool = [JobWorker(grid, f"w{n}") for n in range(workers)]
    for w in pool:
        w.join()
    (jid,) = alice.submit(spec)
    for w in pool:
        w.assigned(1)
    return alice, pool, jid


def run_with_liar(grid: GridHarness, alice: JobClient, third: Replier) -> str:
    """A replicas 2 / quorum 2 job on the liar and one honest worker (the only ones
    online), then ``third`` joins and breaks the tie. Returns the job id."""
    (jid,) = alice.submit({"command": "echo 42", "replicas": 2, "quorum": 2})
    results(grid, jid, 2)
    assert job(grid, jid).state is JobState.QUEUED, "disagreeing: it wants a third replica"
    third.join()
    done = wait_state(grid, jid, JobState.COMPLETED)
    assert done.exit_code == 0
    third.status("offline", clean=True)  # the next job starts on the other two again
    grid.wait_worker(third.wid, "offline")
    return jid


@BOTH_DBS
def test_a_liar_is_outvoted_by_the_quorum(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    liar = replier(grid, "liar", LIE)
    w1 = replier(grid, "w1")
    w3 = Replier(grid, "w3")
    jid = run_with_liar(grid, alice, w3)
    assert [len(w.assigns) for w in (liar, w1, w3)] == [1, 1, 1]
    done = job(grid, jid)
    assert done.worker in {"w1", "w3"}
    assert sorted(attempts(grid, jid)) == [("liar", "invalid"), ("w1", "success"),
                                           ("w3", "success")]
    assert grid.store.result_count(jid) == (1, 3), "one canonical result, recorded once each"
    result = grid.store.job_result(jid)
    assert result is not None
    assert result.stdout == {"sha256": HONEST, "size": 3}
    show = alice.request(JobsShow(job=jid))
    assert isinstance(show, JobsShowReply)
    assert show.job["results"]["stdout"]["sha256"] == HONEST
    assert sorted(a["kind"] for a in show.attempts) == ["invalid", "success", "success"]
    assert grid.store.worker_trust("liar").invalid == 1
    assert grid.store.worker_trust("w1").valid == 1
    assert grid.store.worker_trust("w3").valid == 1
    wait_for(lambda: alice.states_of(jid)[-1:] == ["completed"], 10,
             message="alice told completed")
    assert alice.states_of(jid).count("completed") == 1


def test_a_worker_that_lies_twice_loses_its_trust(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    liar = replier(grid, "liar", LIE)
    w1 = replier(grid, "w1")
    w2 = Replier(grid, "w2")
    run_with_liar(grid, alice, w2)
    assert [len(w.assigns) for w in (liar, w1)] == [1, 1]
    assert grid.store.worker_trust("liar").trusted, "one lie is not enough"
    run_with_liar(grid, alice, w2)
    trust = grid.store.worker_trust("liar")
    assert (trust.invalid, trust.trusted) == (2, False)
    assert grid.store.untrusted_workers() == {"liar"}
    show = alice.request(WorkersShow(worker="liar"))  # what `xcloud show liar` prints
    assert isinstance(show, WorkersShowReply)
    assert show.worker["trust"] == {"valid": 0, "invalid": 2, "trusted": False}
    assert "trust       UNTRUSTED: 0 valid, 2 invalid" in worker_detail(
        WorkerInfo.from_wire(show.worker))
    # Now it gets no replicated work: with only it and w1 online, a replicated job waits
    # for a second trusted worker rather than run on the liar.
    (jid,) = alice.submit({"command": "echo 42", "replicas": 2, "quorum": 2})
    results(grid, jid, 1)
    assert [w for w, _ in attempts(grid, jid)] == ["w1"]
    w2.join()
    wait_state(grid, jid, JobState.COMPLETED)
    assert sorted(w for w, _ in attempts(grid, jid)) == ["w1", "w2"]
    # An unreplicated job still runs anywhere (trust is about quorums).
    (plain,) = alice.submit({"command": "true", "requirements": {"worker": "liar"}})
    wait_state(grid, plain, JobState.COMPLETED)
    grid.store.forget_trust("liar")  # an admin's pardon
    assert grid.store.worker_trust("liar").trusted
    assert grid.store.untrusted_workers() == frozenset()


def test_replicas_run_on_distinct_workers_and_lost_ones_are_replaced(
        grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    big = JobWorker(grid, "big")
    big.join(slots=4)
    (jid,) = alice.submit({"command": "echo 42", "replicas": 3, "quorum": 2})
    big.assigned(1)
    w2 = JobWorker(grid, "w2")
    w2.join()
    w2.assigned(1)
    assert len(big.assigns) == 1, "never two attempts of one job on one worker"
    assert job(grid, jid).state is JobState.QUEUED, "it still wants a third replica"
    w2.crash()  # its replica is lost: another is wanted, never on big again
    wait_for(lambda: ("w2", "worker_lost") in attempts(grid, jid), 10,
             message="w2's replica lost")
    w3 = Replier(grid, "w3")
    w4 = Replier(grid, "w4")
    w3.join()
    w4.join()
    wait_for(lambda: len(attempts(grid, jid)) == 4, 10, message="two more replicas")
    workers = [w for w, _ in attempts(grid, jid)]
    assert sorted(workers) == ["big", "w2", "w3", "w4"]
    done = wait_state(grid, jid, JobState.COMPLETED)  # w3 and w4 agree: quorum 2
    assert done.worker in {"w3", "w4"}
    assert ("big", "cancelled") in attempts(grid, jid), "the last live replica is ended"
    assert len(big.assigns) == 1


def test_replicas_of_two_owners_under_fair_share(grid: GridHarness) -> None:
    """Two owners with queued work: the fair-share pass places the replicas too."""
    start_jobs_coordinator(grid)
    alice, bob = JobClient(grid, "alice"), JobClient(grid, "bob")
    replier(grid, "w1", slots=4)
    replier(grid, "w2", slots=4)
    jobs = [c.submit(*[{"command": f"echo {n}", "replicas": 2, "quorum": 2}
                       for n in range(3)]) for c in (alice, bob)]
    for jid in [j for ids in jobs for j in ids]:
        wait_state(grid, jid, JobState.COMPLETED)
        assert sorted(w for w, _ in attempts(grid, jid)) == ["w1", "w2"]


@BOTH_DBS
def test_a_job_that_never_reaches_quorum_fails_within_its_bound(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    for n in range(4):  # every worker says something else
        replier(grid, f"w{n}", f"{n:x}" * 64)
    (jid,) = alice.submit({"command": "date", "replicas": 2, "quorum": 2,
                           "max_replica_attempts": 3})
    (child,) = alice.submit({"command": "true", "after": [jid], "replicas": 2, "quorum": 2})
    failed = wait_state(grid, jid, JobState.FAILED)
    assert failed.hold_code == "no_quorum"
    assert failed.hold_reason is not None
    assert "no quorum" in failed.hold_reason
    assert failed.exit_code is None
    assert len(attempts(grid, jid)) == 3, "exactly the bound"
    assert grid.store.result_count(jid) == (0, 3), "no canonical result"
    assert all(grid.store.worker_trust(f"w{n}").invalid == 0 for n in range(4)), \
        "nobody is judged without a quorum"
    wait_for(lambda: alice.states_of(jid)[-1:] == ["failed"], 10, message="told failed")
    held = wait_state(grid, child, JobState.HELD)  # a replicated child waited, never ran
    assert held.hold_code == "dependency"
    assert attempts(grid, child) == []


@BOTH_DBS
def test_cancel_kills_every_live_replica(grid: GridHarness) -> None:
    alice, workers, jid = replicated(grid, 3, {"command": "sleep 60", "replicas": 3, "quorum": 2})
    assert job(grid, jid).state is JobState.RUNNING, "all it wants is in flight"
    reply = alice.request(JobsCancel(jobs=[jid]))
    assert isinstance(reply, Ok)
    assert (reply.detail or {}).get("changed") == 1
    wait_for(lambda: all(w.killed(w.assigns[0].attempt) for w in workers), 10,
             message="every replica's worker told job.kill")
    assert [k for _, k in attempts(grid, jid)] == ["cancelled"] * 3
    late = workers[0].report_attempt(workers[0].assigns[0].attempt, "success", exit_code=0)
    assert isinstance(late, Ok)
    assert late.detail == {"recorded": True, "counted": False}
    assert job(grid, jid).state is JobState.CANCELLED
    # events go out after the commit (the outbox), not before the cancel's reply
    wait_for(lambda: "cancelled" in alice.states_of(jid), 10, message="alice told cancelled")
    assert alice.states_of(jid).count("cancelled") == 1


def test_why_says_a_replicated_job_waits_for_a_distinct_worker(grid: GridHarness) -> None:
    """Three replicas, two workers: the third waits for a worker that ran none, and `why`
    says so instead of 'waiting for a free slot' (neither busy worker may take it)."""
    alice, _workers, jid = replicated(grid, 2, {"command": "sleep 60", "replicas": 3,
                                                "quorum": 2})
    assert job(grid, jid).state is JobState.QUEUED, "it still wants a third replica"
    reply = alice.request(JobsWhy(job=jid))
    assert isinstance(reply, JobsWhyReply), reply
    assert "distinct workers" in reply.verdict, reply.verdict
    assert "of the 2 matching, 2 hold or ran one of its replicas" in reply.verdict
    assert "it wants 1 more" in reply.verdict
    assert reply.matching is not None
    assert reply.matching["all"] == 0


@BOTH_DBS
def test_hold_kills_the_replicas_and_release_runs_them_again(grid: GridHarness) -> None:
    alice, workers, jid = replicated(grid, 2, {"command": "echo 42", "replicas": 2,
                                               "quorum": 2, "max_replica_attempts": 2})
    reply = alice.request(JobsHold(jobs=[jid], reason="not now"))
    assert isinstance(reply, Ok)
    wait_for(lambda: all(w.killed(w.assigns[0].attempt) for w in workers), 10,
             message="both replicas killed")
    held = job(grid, jid)
    assert held.state is JobState.HELD
    assert held.attempts == 0, "killed by a hold: nothing of the bound spent"
    for w in workers:
        w.auto = True
    assert isinstance(alice.request(JobsRelease(jobs=[jid])), Ok)
    for w in workers:
        w.assigned(2)
    assert wait_state(grid, jid, JobState.COMPLETED).exit_code == 0
    assert sorted(k for _, k in attempts(grid, jid)) == ["cancelled", "cancelled",
                                                         "success", "success"]


def test_adaptive_jobs_run_alone_on_a_worker_with_a_clean_record(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = replier(grid, "w1")
    w2 = replier(grid, "w2")
    for _ in range(2):  # two quorums: 2 valid results each, none invalid
        (jid,) = alice.submit({"command": "echo 42", "replicas": 2, "quorum": 2})
        wait_state(grid, jid, JobState.COMPLETED)
    assert grid.store.worker_trust("w1").valid == 2
    (alone,) = alice.submit({"command": "echo 42", "replicas": 2, "quorum": 2,
                             "adaptive_after": 2})
    done = wait_state(grid, alone, JobState.COMPLETED)
    assert len(attempts(grid, alone)) == 1, "a veteran ran it unreplicated"
    assert (done.replicas, done.quorum) == (1, 1)
    assert grid.store.result_count(alone) == (1, 1)
    (strict,) = alice.submit({"command": "echo 42", "replicas": 2, "quorum": 2,
                              "adaptive_after": 3})
    wait_state(grid, strict, JobState.COMPLETED)
    assert sorted(w for w, _ in attempts(grid, strict)) == ["w1", "w2"], "no veteran yet"
    assert len(w1.assigns) + len(w2.assigns) == 4 + 1 + 2


def test_bounds_are_refused_at_submit(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    for spec in ({"replicas": 2, "quorum": 3}, {"replicas": 4, "max_replica_attempts": 3},
                 {"adaptive_after": 5}):
        reply = alice.request(JobsSubmit(jobs=[{"command": "true", **spec}]))
        assert isinstance(reply, Error), spec
        assert reply.code == "invalid", spec
        assert "replicas" in reply.message, reply.message
    with pytest.raises(WireError, match="replicas"):  # the schema's bound: 1..16
        alice.request(JobsSubmit(jobs=[{"command": "true", "replicas": 17}]))


@BOTH_DBS
def test_racing_replica_reports_decide_the_job_once(grid: GridHarness) -> None:
    """Three replicas report at once: exactly one completion, one counted result."""
    alice, workers, jid = replicated(grid, 3, {"command": "echo 42", "replicas": 3, "quorum": 2})
    barrier = threading.Barrier(3)
    replies: list[object] = []

    def report(w: JobWorker) -> None:
        barrier.wait()
        replies.append(w.report_attempt(w.assigns[0].attempt, "success", exit_code=0,
                                        stdout={"sha256": HONEST, "size": 3}))

    threads = [threading.Thread(target=report, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(r, Ok) for r in replies)
    assert wait_state(grid, jid, JobState.COMPLETED).exit_code == 0
    assert grid.store.result_count(jid) == (1, 3)
    wait_for(lambda: alice.states_of(jid)[-1:] == ["completed"], 10, message="completed")
    assert alice.states_of(jid).count("completed") == 1


def test_the_quorum_arithmetic() -> None:
    def vote(n: int, sha: str, trusted: bool = True) -> Vote:
        return Vote(f"a{n}", f"w{n}", (0, sha, ()), trusted)

    fresh = decide(replicas=2, quorum=2, issued=0, bound=6, live=0, votes=[])
    assert (fresh.state, fresh.more) == (JobState.QUEUED, 2)
    split = decide(replicas=2, quorum=2, issued=2, bound=6, live=0,
                   votes=[vote(1, "x"), vote(2, "y")])
    assert (split.state, split.more) == (JobState.QUEUED, 1)
    agreed = decide(replicas=2, quorum=2, issued=3, bound=6, live=0,
                    votes=[vote(1, "x"), vote(2, "y"), vote(3, "x")])
    assert agreed.state is JobState.COMPLETED
    assert agreed.canonical == vote(1, "x")
    untrusted = decide(replicas=2, quorum=2, issued=3, bound=6, live=1,
                       votes=[vote(1, "x"), vote(2, "x", trusted=False)])
    assert untrusted.state is JobState.RUNNING, "an untrusted result never makes a quorum"
    spent = decide(replicas=2, quorum=2, issued=6, bound=6, live=0,
                   votes=[vote(n, str(n)) for n in range(6)])
    assert spent.state is JobState.FAILED
    assert spent.canonical is None
    assert decide(replicas=2, quorum=2, issued=2, bound=2, live=1,
                  votes=[vote(1, "x")]).state is JobState.RUNNING
    failing = decide(replicas=2, quorum=2, issued=2, bound=6, live=0,
                     votes=[Vote("a1", "w1", (3, "x", ()), True),
                            Vote("a2", "w2", (3, "x", ()), True)])
    assert failing.state is JobState.FAILED
    assert failing.canonical is not None
    assert max_attempts({}, 2, 2) == 6
    assert max_attempts({"max_replica_attempts": 3}, 2, 2) == 3
    assert AttemptKind.INVALID.value == "invalid"


@pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)
def test_a_sweep_with_real_workers_catches_the_liar(grid: GridHarness) -> None:
    """Real WorkerAgents and the Python client: the worker named liar prints 41 where
    the others print 42 (its work dirs are under its own state dir). Its replicas are
    outvoted once an honest second opinion joins, and three lies cost its trust."""
    from tests.test_jobs_e2e import agent, alice, states

    start_jobs_coordinator(grid)
    agent(grid, "liar", slots=1)
    agent(grid, "w1", slots=1)
    client = alice(grid)
    command = 'case "$PWD" in */workers/liar/*) echo 41 ;; *) echo 42 ;; esac'
    futures = [client.submit(command, replicas=2, quorum=2, index=n) for n in range(3)]
    wait_for(lambda: all(grid.store.result_count(f.job)[1] >= 2 for f in futures), 60,
             message="liar and w1 answered every job")
    assert not any(f.done() for f in futures), "1 against 1 decides nothing"
    agent(grid, "w2", slots=1)
    for fut in futures:
        result = fut.result(timeout=60)
        assert result.state == "completed"
        assert result.stdout == b"42\n"
        kinds = sorted(states(client, fut.job))
        assert kinds == ["invalid", "success", "success"], kinds
    trust = grid.store.worker_trust("liar")
    assert (trust.invalid, trust.trusted) == (3, False)
    assert grid.store.worker_trust("w1").valid == 3


@pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)
def test_cli_and_shell_submit_replicas(grid: GridHarness, tmp_path: Path) -> None:
    """``xcloud submit --sweep F --replicas 2 --quorum 2 --wait`` and the shell's
    ``submit --replicas 2 --quorum 2``: each job ran on both workers, results agreed."""
    from tests.test_jobs_cli import _cli
    from tests.test_jobs_e2e import agent
    from tests.test_shell_jobs import _shell, _submitted

    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=2)
    agent(grid, "w2", slots=2)
    (tmp_path / "seeds.txt").write_text("1\n2\n3\n")
    sub = _cli(grid, "submit", "--sweep", "seeds.txt", "--replicas", "2", "--quorum", "2",
               "--wait", "--json", "--", "echo {}", cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    ids = json.loads(sub.stdout)
    assert len(ids) == 3
    for jid in ids:
        assert sorted(attempts(grid, jid)) == [("w1", "success"), ("w2", "success")]
    bad = _cli(grid, "submit", "--replicas", "2", "--quorum", "3", "--", "true", cwd=tmp_path)
    assert bad.returncode != 0
    assert "quorum is 1 to replicas (2)" in bad.stderr
    assert "Traceback" not in bad.stderr
    shell, _out, err = _shell(grid)
    jid = _submitted(shell, "submit --replicas 2 --quorum 2 -- echo hi")
    wait_state(grid, jid, JobState.COMPLETED)
    assert sorted(w for w, _ in attempts(grid, jid)) == ["w1", "w2"]
    assert "Traceback" not in err.getvalue()


def test_an_unreplicated_job_runs_the_same_statements_as_before() -> None:
    """replicas 1 is benchmarked: its assignment and its report keep their 3 and 6
    statements (the replica code branches on the rows those already read) and never
    read the replica tables."""
    from coordinator.store import Store

    store = Store.open("sqlite:///:memory:")
    try:
        statements: list[str] = []
        execute: Any = store.db.execute_sql

        def counting(sql: str, params: object = None, *args: object, **kw: object) -> object:
            statements.append(sql)
            return execute(sql, params, *args, **kw)

        store.db.execute_sql = counting  # type: ignore[method-assign]
        _batch, (jid,) = store.submit_jobs("alice", [{"command": "true"}])
        statements.clear()
        made = store.assign_job(jid, "w1")
        assert made is not None
        assert len(statements) == 3, statements
        statements.clear()
        outcome = store.record_report(made[0].id, "w1", AttemptKind.SUCCESS,
                                      outcome={"exit_code": 0}, stdout=None, stderr=None,
                                      outputs=[], started_at=None, ended_at=None)
        assert outcome.counted
        assert len(statements) == 6, statements
        assert not any("xc_worker_trust" in s for s in statements)
    finally:
        store.close()
