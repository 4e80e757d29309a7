"""Fair share between principals and input locality (coordinator/fair_share.py,
coordinator/job_locality.py, docs/jobs.md "Fair share and locality"), and
``jobs.summary`` (client/jobs_summary.py).

The share tests drive the real scheduler's pass on a real store (SQLite and MariaDB)
with scripted workers: records with caps in the store, attempts ended by recorded
reports, no bus (assignments are committed, their ``job.assign`` goes nowhere), so a
run of a thousand jobs takes a second and is the same every time (a seeded order).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, cast

import pytest

from bench.scheduler_pass import QuietBus  # (the offline pass's stand-in bus, shared)
from broker.config import JobsConfig
from coordinator.job_state import AttemptKind, JobState
from coordinator.scheduler import JobScheduler
from coordinator.store import Store
from schemas.topics import Topics
from tests.fixtures.backends import BOTH_DBS
from tests.fixtures.grid import GridHarness
from tests.job_actors import JobClient, JobWorker, start_jobs_coordinator

T0 = 1_700_000_000.0


def _caps(wid: str, slots: int, data: list[str] | None = None) -> dict[str, Any]:
    return {
        "wid": wid, "name": wid, "description": "", "tags": ["linux"], "slots": slots,
        "executors": ["process"],
        "host": {"hostname": wid, "os": "Linux", "os_release": "6.1", "arch": "x86_64"},
        "cpu": {"count": slots, "physical": slots, "model": "x", "freq_mhz": 2000.0},
        "memory_bytes": slots * 2**30, "disk_total_bytes": 10**12,
        "disk_free_bytes": 10**11,
        "docker": {"available": False, "version": None, "images": []},
        "shared": {"apps": [], "packages": [], "data": data or []},
        "agent_version": "0.1.0"}


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(grid_db_url: str) -> Iterator[Store]:
    with Store.open(grid_db_url) as opened:
        yield opened


def _scheduler(store: Store, clock: Clock, **jobs: Any) -> JobScheduler:
    config = JobsConfig(**jobs)
    return JobScheduler(cast(Any, QuietBus()), store, cast(Any, None), config,
                        Topics("xc-fair"), clock=clock)


def _workers(store: Store, count: int, slots: int) -> None:
    for i in range(count):
        store.upsert_worker_caps(f"w{i}", _caps(f"w{i}", slots), T0)


def _submit(store: Store, owner: str, count: int, clock: Clock, **spec: Any) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 500):
        _, part = store.submit_jobs(owner, [{"command": "true", **spec}
                                            for _ in range(min(500, count - start))],
                                    now=clock())
        ids += part
    return ids


def _finish_some(store: Store, rng: random.Random, fraction: float, clock: Clock) -> None:
    """A random part of the running attempts report success (as workers would)."""
    live = store.live_attempts()
    for attempt in rng.sample(live, max(1, int(len(live) * fraction))) if live else ():
        store.record_report(attempt.id, attempt.worker_id, AttemptKind.SUCCESS,
                            outcome={"exit_code": 0}, stdout=None, stderr=None, outputs=[],
                            started_at=clock(), ended_at=clock(), now=clock())


def _run(store: Store, sched: JobScheduler, owners: list[str], clock: Clock,
         rounds: int, seed: int = 7) -> dict[str, int]:
    """Passes with random completions in between; per owner, the slots it held summed
    over the passes in which every owner in ``owners`` still had queued work."""
    rng = random.Random(seed)
    held = dict.fromkeys(owners, 0)
    for _ in range(rounds):
        clock.t += 0.5
        sched.run_pass()
        queued = {o: bool(store.queued_jobs_of(o, 1)) for o in owners}
        if not all(queued.values()):
            break
        usage = store.live_attempts_by_owner()
        for o in owners:
            held[o] += usage.get(o, 0)
        _finish_some(store, rng, rng.uniform(0.2, 0.8), clock)
    return held


# -- fair share -------------------------------------------------------------------------


@BOTH_DBS
def test_ten_jobs_are_not_starved_by_a_thousand(store: Store) -> None:
    clock = Clock()
    _workers(store, 4, slots=2)
    _submit(store, "alice", 1000, clock)
    clock.t += 1
    bob = _submit(store, "bob", 10, clock)  # submitted after all of alice's
    sched = _scheduler(store, clock)
    held = _run(store, sched, ["alice", "bob"], clock, rounds=200)
    total = held["alice"] + held["bob"]
    assert total > 0
    assert abs(held["bob"] / total - 0.5) <= 0.05, held
    # bob's first pass already ran half the slots' worth of his jobs
    assert sum(1 for j in bob if (store.get_job(j) or _never()).attempts) == 10


def _never() -> Any:
    raise AssertionError("job vanished")


@BOTH_DBS
def test_without_fair_share_the_older_queue_runs_first(store: Store) -> None:
    """The control: the same run with fair share off starves bob (so the test above
    can fail)."""
    clock = Clock()
    _workers(store, 4, slots=2)
    _submit(store, "alice", 1000, clock)
    clock.t += 1
    _submit(store, "bob", 10, clock)
    sched = _scheduler(store, clock, fair_share=False)
    held = _run(store, sched, ["alice", "bob"], clock, rounds=20)
    assert held["bob"] == 0
    assert held["alice"] > 0


def test_weights_two_to_one_give_two_to_one(store: Store) -> None:
    clock = Clock()
    _workers(store, 3, slots=3)
    _submit(store, "bob", 600, clock)  # first in the queue
    _submit(store, "alice", 600, clock)
    sched = _scheduler(store, clock, shares={"alice": 2.0})
    held = _run(store, sched, ["alice", "bob"], clock, rounds=150)
    assert abs(held["alice"] / held["bob"] - 2.0) <= 0.2, held  # within 10 %


def test_priorities_order_each_owners_own_queue(store: Store) -> None:
    clock = Clock()
    _workers(store, 1, slots=2)
    _submit(store, "alice", 5, clock)
    (urgent,) = _submit(store, "alice", 1, clock, priority=5)
    _submit(store, "bob", 5, clock)
    (bob_urgent,) = _submit(store, "bob", 1, clock, priority=9)
    _scheduler(store, clock).run_pass()
    running = {a.job_id for a in store.live_attempts()}
    assert running == {urgent, bob_urgent}


def test_a_head_that_fits_nowhere_does_not_block_the_others(store: Store) -> None:
    clock = Clock()
    _workers(store, 2, slots=1)
    _submit(store, "alice", 50, clock, requirements={"tags": ["gpu"]})  # fits no worker
    bob = _submit(store, "bob", 3, clock)
    _scheduler(store, clock).run_pass()
    assert {a.job_id for a in store.live_attempts()} <= set(bob)
    assert len(store.live_attempts()) == 2


# -- locality -------------------------------------------------------------------------------


def test_locality_prefers_the_worker_caching_the_inputs(store: Store) -> None:
    clock = Clock()
    sha = "ab" * 32
    store.upsert_worker_caps("w-big", _caps("w-big", 4), T0)  # the most free slots
    store.upsert_worker_caps("w-cache", _caps("w-cache", 2, [f"sha256:{sha}"]), T0)
    spec = {"command": "wc -l in.txt", "inputs": [{"name": "in.txt", "sha256": sha}]}
    _, (job,) = store.submit_jobs("alice", [spec], now=clock())
    _, (plain,) = store.submit_jobs("alice", [{"command": "true"}], now=clock())
    _scheduler(store, clock).run_pass()
    where = {a.job_id: a.worker_id for a in store.live_attempts()}
    assert where[job] == "w-cache"
    assert where[plain] == "w-big"  # without inputs: the most free slots, as before


def test_locality_never_overrides_fair_share(store: Store) -> None:
    clock = Clock()
    sha = "cd" * 32
    store.upsert_worker_caps("w1", _caps("w1", 1, [f"sha256:{sha}"]), T0)
    spec = {"command": "true", "inputs": [{"name": "x", "sha256": sha}]}
    _submit(store, "alice", 3, clock, **spec)
    clock.t += 1
    (bob,) = _submit(store, "bob", 1, clock)
    store.submit_jobs("alice", [{"command": "true"}], now=clock())
    sched = _scheduler(store, clock)
    clock.t += 1
    sched.run_pass()
    (first,) = store.live_attempts()
    assert first.owner == "alice"  # equal usage: by name first, then round the owners
    _finish_some(store, random.Random(1), 1.0, clock)
    sched.run_pass()
    (second,) = store.live_attempts()
    assert second.job_id == bob
    assert store.get_job(bob) is not None
    assert (store.get_job(bob) or _never()).state is JobState.RUNNING


# -- the store's per-owner reads --------------------------------------------------------------


@BOTH_DBS
def test_per_owner_counts_and_heads(store: Store) -> None:
    clock = Clock()
    _workers(store, 1, slots=1)
    _submit(store, "alice", 3, clock)
    (parent,) = _submit(store, "bob", 1, clock)
    store.submit_jobs("bob", [{"command": "true", "after": [parent]}], now=clock())
    (held,) = _submit(store, "carol", 1, clock)
    store.change_jobs([held], JobState.HELD, requester="carol", admin=False, now=clock())
    assert store.queued_owners() == ["alice", "bob"]  # carol's is held, not queued
    assert [j.id for j in store.queued_jobs_of("bob", 10)] == [parent]  # not the waiting
    sched = _scheduler(store, clock)
    sched.run_pass()  # one slot: alice's (by name), the first of her queue
    (attempt,) = store.live_attempts()
    assert attempt.owner == "alice"
    store.record_report(attempt.id, attempt.worker_id, AttemptKind.EXIT_NONZERO,
                        outcome={"exit_code": 3}, stdout=None, stderr=None, outputs=[],
                        started_at=clock(), ended_at=clock(), now=clock())
    clock.t += 1
    sched.run_pass()  # now bob's turn: he was never served
    assert store.live_attempts_by_owner() == {"bob": 1}
    counts = store.job_counts_by_owner(clock() - 3600)
    assert counts == {"alice": {"queued": 2, "failed": 1}, "bob": {"running": 1, "waiting": 1},
                      "carol": {"held": 1}}
    assert store.job_counts_by_owner(clock() + 1) == {
        "alice": {"queued": 2}, "bob": {"running": 1, "waiting": 1}, "carol": {"held": 1}}


def test_summary_rows_client_and_admin_views(store: Store) -> None:
    from coordinator.fair_share import summary_rows

    clock = Clock()
    _workers(store, 1, slots=3)
    _submit(store, "alice", 5, clock)
    _submit(store, "bob", 5, clock)
    sched = _scheduler(store, clock, shares={"alice": 2.0})
    sched.run_pass()
    rows, totals, more = summary_rows(store, sched.fair, principal=None)
    assert not more
    by = {r["principal"]: r for r in rows}
    assert (by["alice"]["slots"], by["bob"]["slots"]) == (2, 1)
    assert (by["alice"]["weight"], by["bob"]["weight"]) == (2.0, 1.0)
    assert by["alice"]["target_share"] == pytest.approx(2 / 3, abs=1e-3)
    assert by["bob"]["busy_share"] == pytest.approx(1 / 3, abs=1e-3)
    assert totals == {"queued": 7, "waiting": 0, "running": 3, "held": 0, "completed": 0,
                      "failed": 0, "slots": 3, "owners": 2, "active": 2}
    mine, totals_seen, _ = summary_rows(store, sched.fair, principal="bob")
    assert [r["principal"] for r in mine] == ["bob"]
    assert totals_seen == totals
    nobody, _, _ = summary_rows(store, sched.fair, principal="dave")  # no jobs: zeros
    assert nobody[0]["principal"] == "dave"
    assert nobody[0]["queued"] == 0


# -- over the bus: jobs.summary, why, the CLI's text --------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)
def test_summary_and_why_over_the_bus(grid: GridHarness) -> None:
    from client.jobs_summary import summary_text
    from client.why_cli import why_text
    from schemas.job_messages import JobsSummary, JobsSummaryReply, JobsWhy, JobsWhyReply

    start_jobs_coordinator(grid, shares={"alice": 2.0})
    alice = JobClient(grid, "alice")
    bob = JobClient(grid, "bob")
    admin = JobClient(grid, "boss", role="admin")
    alice.submit(*({"command": f"echo {i}"} for i in range(3)))
    bob_jobs = bob.submit({"command": "true"}, {"command": "true"})
    worker = JobWorker(grid, "w1")
    worker.join(slots=1)
    (first,) = worker.assigned(1)
    runner = "alice" if first.owner == "alice" else "bob"

    seen = bob.request(JobsSummary())
    assert isinstance(seen, JobsSummaryReply), seen
    assert [r["principal"] for r in seen.lines] == ["bob"]  # a client: its own line
    assert seen.totals["queued"] == 4
    assert seen.totals["slots"] == 1
    assert seen.totals["owners"] == 2
    assert seen.fair_share is True
    text = summary_text(seen.to_dict())
    assert "bob" in text
    assert "alice" not in text

    everyone = admin.request(JobsSummary())
    assert isinstance(everyone, JobsSummaryReply), everyone
    by = {r["principal"]: r for r in everyone.lines}
    assert set(by) == {"alice", "bob"}
    assert by[runner]["slots"] == 1
    assert by[runner]["busy_share"] == 1.0
    assert (by["alice"]["weight"], by["bob"]["weight"]) == (2.0, 1.0)
    assert by["alice"]["target_share"] == pytest.approx(2 / 3, abs=1e-3)
    lines = summary_text(everyone.to_dict()).splitlines()
    assert lines[0].split() == ["PRINCIPAL", "QUEUED", "WAITING", "RUNNING", "HELD",
                                "COMPLETED", "FAILED", "SLOTS", "WEIGHT", "SHARE", "TARGET"]
    assert lines[1].split()[0] == runner
    assert lines[1].split()[-2:] == [
        "100%", "67%" if runner == "alice" else "33%"]

    queued = next(j for j in bob_jobs if j != first.job)
    reply = bob.request(JobsWhy(job=queued))
    assert isinstance(reply, JobsWhyReply), reply
    assert reply.fairness is not None
    assert reply.fairness.startswith(f"bob holds {1 if runner == 'bob' else 0} slot(s) for "
                                  "weight 1 (target 33% of the busy slots)")
    assert "1 other principal(s)" in reply.fairness
    assert "alice" not in reply.fairness
    assert f"share: {reply.fairness}" in why_text(reply.to_dict())

    refused = worker.request(JobsSummary())  # a worker is not a person: refused
    assert getattr(refused, "code", None) == "forbidden", refused


# -- configuration -----------------------------------------------------------------------------


def test_shares_from_toml_tables_and_the_environment(tmp_path: Any) -> None:
    from broker.config import ConfigError, load_config

    path = tmp_path / "config.toml"
    path.write_text("[jobs]\nshares = {alice = 2, bob = 1}\n")
    assert load_config(path, env={}).jobs.shares == {"alice": 2.0, "bob": 1.0}
    path.write_text('[jobs.shares]\nalice = 3\n"team.x" = 0.5\n')
    assert load_config(path, env={}).jobs.shares == {"alice": 3.0, "team.x": 0.5}
    env = {"XCLOUD_JOBS_SHARES": "carol=4, dave=1.5", "XCLOUD_JOBS_FAIR_SHARE": "off"}
    jobs = load_config(path, env=env).jobs
    assert jobs.shares == {"carol": 4.0, "dave": 1.5}
    assert jobs.fair_share is False
    for bad in ("alice=0", "alice=-1", "alice", "alice=x"):
        with pytest.raises(ConfigError, match="shares"):
            load_config(path, env={"XCLOUD_JOBS_SHARES": bad})
    path.write_text("[jobs]\nshares = 2\n")
    with pytest.raises(ConfigError, match="expected a table"):
        load_config(path, env={})
