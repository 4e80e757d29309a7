"""Prefetch and stealing (coordinator/job_prefetch.py, docs/jobs.md "Prefetch"): a full
worker is given its next job ahead of a free slot, never more than ``[jobs] prefetch``
beyond its slots, never a GPU job; an attempt that waits there too long without starting
goes back to the queue, without spending a retry, when another worker has a free slot.
Simulated workers (tests/job_actors.py) against the real coordinator."""

from __future__ import annotations

from coordinator.job_state import JobState
from schemas.messages import Ok
from tests.fixtures.backends import BOTH_DBS
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import JobClient, JobWorker, start_jobs_coordinator


def _worker(grid: GridHarness, wid: str, slots: int) -> JobWorker:
    w = JobWorker(grid, wid)
    w.join(slots=slots)
    return w


def _live(grid: GridHarness, wid: str) -> list[str]:
    return [a.id for a in grid.store.live_attempts(wid)]


@BOTH_DBS
def test_a_full_worker_holds_its_next_job_and_gives_it_back_to_an_idle_one(
        grid: GridHarness) -> None:
    start_jobs_coordinator(grid, prefetch=1, steal_after_s=0.3)
    alice = JobClient(grid, "alice")
    w1 = _worker(grid, "w1", slots=1)
    ids = alice.submit(*({"command": f"echo {i}"} for i in range(3)))
    first, waiting = w1.assigned(2)  # its slot and one ahead of it
    assert isinstance(w1.started(first.attempt), Ok)  # the first runs; the second waits
    # no more than slots + prefetch: the third job stays queued (one batch is queued in
    # id order: which job is third is not the submission's index)
    (third,) = set(ids) - {first.job, waiting.job}
    job3 = grid.store.get_job(third)
    assert job3 is not None
    assert job3.state is JobState.QUEUED
    assert len(_live(grid, "w1")) == 2
    # a GPU job is never sent ahead of a slot
    w2 = _worker(grid, "w2", slots=1)
    (second_first,) = w2.assigned(1)
    assert second_first.job == third  # the queue's head went to the free slot first
    assert isinstance(w2.started(second_first.attempt), Ok)
    (gpu_job,) = alice.submit({"command": "nvidia-smi", "resources": {"gpus": 1}})
    w3 = _worker(grid, "w3", slots=1)  # no GPUs: the GPU job is for nobody here
    # w3 is idle and nothing it can run is queued: after steal_after_s the attempt
    # waiting on w1 (never started) moves to w3, spending no retry
    (moved,) = w3.assigned(1, timeout=10)
    assert moved.job == waiting.job
    wait_for(lambda: w1.killed(waiting.attempt), 10, message="w1 told to drop it")
    shown = grid.store.get_job(waiting.job)
    assert shown is not None
    assert (shown.system_failures, shown.job_failures) == (0, 0)
    assert next(a.kind.value for a in grid.store.job_attempts(waiting.job)[0]) == (
        "lease_expired")
    # the started attempts stay where they run, and the GPU job waits for a GPU worker
    assert first.attempt in _live(grid, "w1")
    assert second_first.attempt in _live(grid, "w2")
    gpu = grid.store.get_job(gpu_job)
    assert gpu is not None
    assert gpu.state is JobState.QUEUED


@BOTH_DBS
def test_without_prefetch_a_worker_gets_no_more_than_its_slots(grid: GridHarness) -> None:
    start_jobs_coordinator(grid, prefetch=0)
    alice = JobClient(grid, "alice")
    w1 = _worker(grid, "w1", slots=2)
    alice.submit(*({"command": f"echo {i}"} for i in range(4)))
    first, second = w1.assigned(2)
    w1.report_attempt(first.attempt, "success", exit_code=0)
    third = w1.assigned(3)[2]
    assert len(_live(grid, "w1")) == 2
    assert third.attempt not in (first.attempt, second.attempt)


@BOTH_DBS
def test_prefetch_never_exceeds_the_queue_a_worker_advertises(grid: GridHarness) -> None:
    """[jobs] prefetch 3 but the worker queues only 1 beyond its slot: it is given 2 jobs,
    not 4 (the two more would be refused busy, and a busy worker gets nothing until its
    next heartbeat: bench.jobs with prefetch 4 fell to 2 jobs/s)."""
    start_jobs_coordinator(grid, prefetch=3)
    alice = JobClient(grid, "alice")
    w1 = JobWorker(grid, "w1")
    w1.join(slots=1, job_queue=1)
    ids = alice.submit(*({"command": f"echo {i}"} for i in range(5)))
    first, ahead = w1.assigned(2)
    # a second worker's slot takes the queue's head in a later pass: by then the pass
    # that gave w1 its jobs is committed
    w2 = JobWorker(grid, "w2")
    w2.join(slots=1, job_queue=0)
    w2.assigned(1)
    assert len(_live(grid, "w1")) == 2
    assert len(_live(grid, "w2")) == 1
    queued = [j for j in ids if (job := grid.store.get_job(j)) is not None
              and job.state is JobState.QUEUED]
    assert len(queued) == 2
    assert {first.job, ahead.job}.isdisjoint(queued)
