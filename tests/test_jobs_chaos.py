"""Batch jobs under chaos (issue 10, item 6): real processes killed at random moments.

- Workers (``xcloud worker`` children) killed with SIGKILL mid-job, ``XCLOUD_CHAOS_TRIALS``
  times (10 in the suite; the issue's 100 with ``XCLOUD_CHAOS_TRIALS=100``), shared by
  the two brokers: no job lost, each ends in exactly one terminal state, and a killed worker's
  job is assigned again within the liveness deadline.
- The coordinator (``xcloud coordinator``) killed with SIGKILL with 500 jobs queued and
  running, then restarted: every job ends once, each result recorded once.
- The broker (Mosquitto) restarted mid-flow: every job ends, results once.
- Retry budgets stay exact when a kill spends the system budget.

The truth is counted in the database (``xc_job``, ``xc_attempt``, ``xc_job_result``) and in
the ``job.event``s the owner receives. The moment of each kill is drawn at random (a
chaos test's input, not a synchronisation: every wait is a ``wait_for`` on observed state).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
import statistics
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest

from coordinator.store import AttemptRecord
from schemas.job_messages import TERMINAL_JOB_STATES
from tests.fixtures.backends import BrokerHandle
from tests.fixtures.coordinator_process import CoordinatorProcess
from tests.fixtures.grid import HEARTBEAT_S, LIVENESS_FACTOR, GridHarness, WorkerHandle
from tests.fixtures.services import wait_for
from tests.job_actors import JobClient, start_jobs_coordinator

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.integration]

TRIALS = int(os.environ.get("XCLOUD_CHAOS_TRIALS", "10"))
# Kill → the job's next assignment: the liveness deadline plus the slack a loaded
# 2-core machine needs (the will's delivery, the scheduler's pass, one DB commit).
LIVENESS_DEADLINE_S = LIVENESS_FACTOR * HEARTBEAT_S
SLACK_S = 1.0
SYSTEM_FAILURES = ("worker_lost", "lease_expired")
ONE_BROKER = pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)


# ------------------------------------------------------------------------------ counting


def job_states(grid: GridHarness, ids: Iterable[str]) -> Counter[str]:
    """xc_job rows by state, for ``ids``."""
    wanted = set(ids)
    model: Any = grid.store.models.Job
    with grid.store.db.connection_context():
        return Counter(str(row["state"]) for row in model.select(model.id, model.state).dicts()
                       if row["id"] in wanted)


def attempts_by_job(grid: GridHarness) -> dict[str, list[dict[str, Any]]]:
    """Every xc_attempt row, per job, in assignment order."""
    model: Any = grid.store.models.Attempt
    found: dict[str, list[dict[str, Any]]] = {}
    with grid.store.db.connection_context():
        for row in model.select().order_by(model.assigned_at).dicts():
            found.setdefault(str(row["job_id"]), []).append(row)
    return found


def results_by_job(grid: GridHarness) -> dict[str, list[dict[str, Any]]]:
    """Every xc_job_result row, per job."""
    model: Any = grid.store.models.JobResult
    found: dict[str, list[dict[str, Any]]] = {}
    with grid.store.db.connection_context():
        for row in model.select().dicts():
            found.setdefault(str(row["job_id"]), []).append(row)
    return found


def all_terminal(grid: GridHarness, ids: list[str], timeout: float, what: str) -> None:
    def done() -> bool:
        states = job_states(grid, ids)
        return sum(states[s] for s in TERMINAL_JOB_STATES) == len(ids)

    try:
        wait_for(done, timeout, interval=0.05, message=what)
    except AssertionError:
        raise AssertionError(f"{what}: {dict(job_states(grid, ids))}") from None


def assert_each_result_once(grid: GridHarness, ids: list[str]) -> None:
    """Every job completed, with exactly one counted result and one successful attempt."""
    states = job_states(grid, ids)
    assert states == Counter({"completed": len(ids)}), dict(states)
    results = results_by_job(grid)
    attempts = attempts_by_job(grid)
    counted = {j: [r for r in results.get(j, []) if r["counted"]] for j in ids}
    assert all(len(rows) == 1 for rows in counted.values()), {
        j: len(rows) for j, rows in counted.items() if len(rows) != 1}
    assert sum(len(rows) for rows in counted.values()) == states["completed"]
    # A job's counted result is its current attempt's success; a rerun's late report
    # (if any) is recorded as stale, never counted.
    for jid in ids:
        (row,) = counted[jid]
        assert row["kind"] == "success", row
        assert [a["kind"] for a in attempts[jid]].count("success") <= 1 or any(
            r["kind"] == "stale" for r in results[jid]), attempts[jid]
        record = grid.store.get_job(jid)
        assert record is not None
        assert record.current_attempt == row["attempt_id"]
        assert all(not a["live"] for a in attempts[jid])


def live_attempt(grid: GridHarness, jid: str) -> AttemptRecord | None:
    record = grid.store.get_job(jid)
    if record is None or record.current_attempt is None:
        return None
    attempt = grid.store.get_attempt(record.current_attempt)
    if attempt is None or attempt.ended_at is not None:
        return None
    return attempt


def running_attempt(grid: GridHarness, jid: str) -> AttemptRecord | None:
    """The job's live attempt once its worker acknowledged it (and starts it at once:
    ``attempt.started`` comes only after 0.25 s of running, a short job sends none)."""
    attempt = live_attempt(grid, jid)
    return attempt if attempt is not None and attempt.acked_at is not None else None


def start_workers(grid: GridHarness, names: list[str], slots: int) -> list[WorkerHandle]:
    """``xcloud worker`` children, started together, then waited for."""
    handles = [grid.start_worker(n, in_subprocess=True, slots=slots, wait_online=False)
               for n in names]
    for handle in handles:
        online(grid, handle)
    return handles


def online(grid: GridHarness, handle: WorkerHandle, timeout: float = 30.0) -> None:
    try:
        grid.wait_worker(handle.wid, "online", timeout=timeout)
    except AssertionError as err:
        raise AssertionError(f"{err}\nworker log:\n{handle.log_text()}") from None


# ------------------------------------------------------------------- 1. worker SIGKILL


def run_worker_kill_trials(grid: GridHarness, trials: int, seed: int) -> dict[str, Any]:
    """``trials`` rounds: two jobs (sleep 0.05–0.5 s) on 2-slot workers; the worker of
    the longer one is SIGKILLed at a random moment of its run; a replacement joins.
    Returns the figures (and asserts the invariants)."""
    rng = random.Random(seed)
    start_jobs_coordinator(grid, assign_ack_s=2)
    names = [f"w{i}" for i in range(trials + 4)]
    grid.add_principals(*((n, "worker") for n in names))
    fresh = iter(names)
    # Four workers: while replacements start, two are online for the next round.
    pool = start_workers(grid, [next(fresh) for _ in range(4)], slots=2)
    alice = JobClient(grid, "alice")
    ids: list[str] = []
    kills: list[tuple[str, str, float]] = []  # (job, killed attempt, kill time)
    for trial in range(trials):
        # Two online workers (the replacement of the last round may still be starting).
        wait_for(lambda: sum(1 for h in pool if (r := grid.worker_record(h.wid)) is not None
                             and r.state.value == "online") >= 2,
                 timeout=30, message=f"round {trial}: two workers online")
        sleeps = [round(rng.uniform(0.05, 0.5), 3) for _ in range(2)]
        pair = alice.submit(*({"command": f"sleep {s}", "max_system_retries": 3,
                               "name": f"t{trial}-{k}"} for k, s in enumerate(sleeps)))
        ids += pair
        target = pair[sleeps.index(max(sleeps))]
        attempt = wait_for(functools.partial(running_attempt, grid, target),
                           timeout=20, interval=0.01,
                           message=f"round {trial}: {target} running")
        victim = next(h for h in pool if h.wid == attempt.worker_id)
        assert attempt.acked_at is not None
        remaining = max(sleeps) - (time.time() - attempt.acked_at)
        time.sleep(rng.uniform(0.0, max(remaining, 0.0)))  # the random moment (see top)
        victim.signal(signal.SIGKILL)
        killed_at = time.time()
        assert victim.proc is not None
        victim.proc.wait(10)
        pool.remove(victim)
        pool.append(grid.start_worker(next(fresh), in_subprocess=True, slots=2,
                                      wait_online=False))
        kills.append((target, attempt.id, killed_at))
        all_terminal(grid, pair, 30, f"round {trial}: both jobs ended")

    all_terminal(grid, ids, 30, "every job ended")
    states = job_states(grid, ids)
    attempts = attempts_by_job(grid)
    results = results_by_job(grid)
    lost = len(ids) - sum(states[s] for s in TERMINAL_JOB_STATES)
    # exactly one terminal state: one terminal job.event and one counted result per job
    wait_for(lambda: all(any(s in TERMINAL_JOB_STATES for s in alice.states_of(j))
                         for j in ids), 10, message="every terminal event received")
    double = [j for j in ids
              if sum(s in TERMINAL_JOB_STATES for s in alice.states_of(j)) > 1
              or sum(1 for r in results.get(j, []) if r["counted"]) > 1]
    delays: list[float] = []
    requeues: list[float] = []
    late: list[str] = []
    for jid, aid, killed_at in kills:
        tries = attempts[jid]
        index = next(i for i, a in enumerate(tries) if a["id"] == aid)
        first = tries[index]
        if first["kind"] not in SYSTEM_FAILURES:
            continue  # it had finished (and reported) before the kill landed
        requeues.append(float(first["ended_at"]) - killed_at)
        assert index + 1 < len(tries), f"{jid}: never assigned again"
        delay = float(tries[index + 1]["assigned_at"]) - killed_at
        delays.append(delay)
        if delay > LIVENESS_DEADLINE_S + SLACK_S:
            late.append(f"{jid} {delay:.3f}s")
    figures = {
        "trials": trials, "jobs": len(ids), "lost": lost, "double_terminal": len(double),
        "mid_job_kills": len(delays), "states": dict(states),
        "attempts": sum(len(attempts[j]) for j in ids),
        "requeue_p50_s": statistics.median(requeues) if requeues else None,
        "requeue_max_s": max(requeues, default=None),
        "reassign_p50_s": statistics.median(delays) if delays else None,
        "reassign_max_s": max(delays, default=None),
    }
    print(f"\nCHAOS worker-kill {grid.broker_kind}: {figures}")
    assert lost == 0, figures
    assert not double, double
    assert states == Counter({"completed": len(ids)}), figures
    # most kills land while the job runs (a 0.05 s job may beat the kill)
    assert len(delays) >= trials // 2, figures
    assert not late, f"reassigned later than {LIVENESS_DEADLINE_S + SLACK_S}s: {late}"
    for jid in ids:
        kinds = [a["kind"] for a in attempts[jid]]
        assert kinds[-1] == "success", (jid, kinds)
        assert all(k in SYSTEM_FAILURES for k in kinds[:-1]), (jid, kinds)
    return figures


def test_worker_sigkill_mid_job_trials(grid: GridHarness) -> None:
    # XCLOUD_CHAOS_TRIALS trials in all, shared by the two brokers
    half = TRIALS // 2
    trials = TRIALS - half if grid.broker_kind == "amqtt" else half
    run_worker_kill_trials(grid, max(trials, 1), seed=TRIALS + len(grid.broker_kind))


# -------------------------------------------------------------- 2. coordinator SIGKILL


@ONE_BROKER
def test_coordinator_sigkill_with_500_jobs(grid: GridHarness) -> None:
    process = CoordinatorProcess(grid)
    process.env.update(XCLOUD_JOBS_PASS_S="0.2", XCLOUD_JOBS_ASSIGN_ACK_S="3",
                       XCLOUD_COORDINATOR_LIVENESS_FACTOR=str(LIVENESS_FACTOR),
                       XCLOUD_COORDINATOR_DEFAULT_HEARTBEAT_S=str(HEARTBEAT_S))
    try:
        process.start()
        alice = JobClient(grid, "alice")
        start_workers(grid, ["w1", "w2"], slots=2)
        ids = alice.submit(*({"command": f"sleep 0.0{i % 10}", "index": i}
                             for i in range(500)))
        assert len(ids) == 500
        wait_for(lambda: job_states(grid, ids)["completed"] >= 40, 60,
                 message="40 jobs completed")
        process.kill()
        at_kill = job_states(grid, ids)
        assert at_kill["running"] > 0, dict(at_kill)
        assert at_kill["queued"] > 0, dict(at_kill)
        process.start()
        all_terminal(grid, ids, 120, "every job ended after the restart")
        assert_each_result_once(grid, ids)
    finally:
        process.stop()


# ---------------------------------------------------------------- 3. broker restart


# Mosquitto only: the embedded amqtt broker's stop can hang (tests/test_jobs_e2e.py).
@ONE_BROKER
def test_broker_restart_mid_flow(grid: GridHarness, grid_broker: BrokerHandle) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    # ``xcloud worker`` children (an in-process agent's stop after the outage trips a
    # bus bug, reported separately: Bus.stop fails a cancelled request future).
    start_workers(grid, ["w1", "w2"], slots=2)
    ids = alice.submit(*({"command": f"sleep 0.0{i % 10}", "index": i} for i in range(60)))
    wait_for(lambda: job_states(grid, ids)["completed"] >= 10, 60,
             message="10 jobs completed")
    grid_broker.stop()
    at_stop = job_states(grid, ids)
    assert at_stop["completed"] < len(ids), dict(at_stop)
    grid_broker.start()
    all_terminal(grid, ids, 90, "every job ended after the broker restart")
    assert_each_result_once(grid, ids)


# ------------------------------------------------------- 4. retry budgets under kills


@ONE_BROKER
def test_retry_budget_exact_when_the_worker_is_killed(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    doomed = grid.start_worker("w-doomed", in_subprocess=True, slots=1)
    alice = JobClient(grid, "alice")
    (jid,) = alice.submit({"command": "sleep 1; exit 1", "max_retries": 2,
                           "max_system_retries": 3})
    wait_for(lambda: running_attempt(grid, jid), 20, interval=0.005,
             message="the first attempt running")
    doomed.kill()
    grid.start_worker("w-spare", slots=1)
    all_terminal(grid, [jid], 60, "the job ended")
    record = grid.store.get_job(jid)
    assert record is not None
    kinds = [a["kind"] for a in attempts_by_job(grid)[jid]]
    assert record.state.value == "failed", (record, kinds)
    # one system failure (its own budget), then exactly 1 + max_retries runs that fail
    assert kinds[0] in SYSTEM_FAILURES, kinds
    assert kinds[1:] == ["exit_nonzero"] * 3, kinds
    assert record.system_failures == 1
    # each failed run's report decided its job (requeue, then failed): counted, once each
    results = results_by_job(grid)[jid]
    assert sorted((r["kind"], bool(r["counted"])) for r in results) == [
        ("exit_nonzero", True)] * 3, results
    # the event follows the commit the store already shows: wait for it to arrive
    wait_for(lambda: any(s in TERMINAL_JOB_STATES for s in alice.states_of(jid)), 10,
             message="alice told the job ended")
    assert [s for s in alice.states_of(jid) if s in TERMINAL_JOB_STATES] == ["failed"]
