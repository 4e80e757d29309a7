"""The batch scheduler's matching at the coordinator (docs/jobs.md, "Scheduling (coordinator)"):
requirements (os, arch, tags, executor, image), slots and priority, a worker's busy
refusal that fails no job, and a pass that stays cheap with 100,000 jobs queued. Workers
are hand-driven (tests/job_actors.py) on both brokers, as in tests/test_jobs_coordinator.py,
whose helpers these tests share."""

from __future__ import annotations

import time

import pytest

from broker.bus import Incoming
from coordinator.job_state import JobState
from schemas.job_messages import JobAssign
from schemas.messages import Ok
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import JobClient, JobWorker, start_jobs_coordinator
from tests.test_jobs_coordinator import job, worker

pytestmark = [pytest.mark.integration]


def test_scheduler_honours_requirements_slots_and_priority(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    small = worker(grid, "small", slots=2, cpu={"count": 2}, tags=["a"])
    # Priority first, then submission; cpus count per slot (1 cpu per slot here).
    low, high, wide, tagged = alice.submit(
        {"command": "low", "priority": -5},
        {"command": "high", "priority": 5},
        {"command": "wide", "resources": {"cpus": 4}},
        {"command": "tagged", "requirements": {"tags": ["b"]}})
    got = small.assigned(2)
    assert {a.job for a in got} == {high, low}
    assert job(grid, high).started_at <= job(grid, low).started_at  # type: ignore[operator]
    time.sleep(0.6)  # three passes: nothing else fits
    assert len(small.assigns) == 2
    assert job(grid, wide).state is JobState.QUEUED  # 4 cpus > the worker's 2
    assert job(grid, tagged).state is JobState.QUEUED
    big = worker(grid, "big", slots=2, cpu={"count": 8}, tags=["b"])
    wait_for(lambda: len(big.assigns) == 2, 10, message="both go to the big worker")
    assert {a.job for a in big.assigns} == {wide, tagged}


@pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)
def test_a_pass_stays_cheap_with_100000_jobs_queued(grid: GridHarness) -> None:
    """The scheduler reads only the head of the queue: one pass with 100,000 jobs queued
    assigns the best ones and takes milliseconds, not a scan."""
    now = time.time()
    rows = [(f"j-{i:016x}", -10 if i == 77_777 else 0, now + i) for i in range(100_000)]
    with grid.store.db.connection_context(), grid.store.db.atomic():
        grid.store.db.cursor().executemany(  # raw: peewee's insert_many takes 10 s here
            "INSERT INTO xc_job (id, batch, owner, name, state, rank, submitted_at, spec, "
            "updated_at, cpus, memory_bytes, gpus, replicas, quorum, after, "
            "max_system_retries, max_retries, system_failures, job_failures, attempts) "
            "VALUES (?, 'b-bulk', 'alice', '', 'queued', ?, ?, '{\"command\":\"true\"}', "
            f"{now}, 1, 0, 0, 1, 1, '[]', 3, 0, 0, 0, 0)", rows)
    coordinator = start_jobs_coordinator(grid, pass_s=3600.0)
    w1 = worker(grid, "w1", slots=2)
    w1.assign_mode = "silent"
    first, second = w1.assigned(2)
    assert {first.job, second.job} == {f"j-{77_777:016x}", f"j-{0:016x}"}, "priority first"
    started = time.monotonic()
    assert coordinator.scheduler.run_pass() == 0  # no free slot: nothing read
    idle = time.monotonic() - started
    w1.bus.stop()  # its slots stay taken; a second worker takes two more
    w2 = worker(grid, "w2", slots=2)
    w2.assign_mode = "silent"
    w2.assigned(2)
    started = time.monotonic()
    coordinator.scheduler.run_pass()
    busy = time.monotonic() - started
    assert idle < 0.5, f"an idle pass took {idle:.3f}s"
    assert busy < 0.5, f"a pass took {busy:.3f}s"


def test_requirements_of_os_executor_and_image(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    plain = worker(grid, "plain")
    worker(grid, "boxed", executors=["process", "docker"],
           docker={"available": True, "images": ["busybox:1.36"]})
    worker(grid, "pulls", executors=["docker"], host={"os": "linux", "arch": "arm64"}, slots=3,
           docker={"available": True})
    listed, unlisted, arm, mac = alice.submit(
        {"command": "true", "requirements": {"image": "busybox:1.36"}},
        {"command": "true", "requirements": {"image": "alpine:3"}},
        {"command": "true", "requirements": {"arch": "ARM64", "executor": "docker"}},
        {"command": "true", "requirements": {"os": "darwin"}})
    wait_for(lambda: job(grid, listed).worker is not None
             and job(grid, unlisted).worker is not None
             and job(grid, arm).worker is not None, 10, message="three placed")
    assert job(grid, listed).worker in ("boxed", "pulls")  # pulls lists no images
    assert job(grid, unlisted).worker == "pulls"  # boxed lists its images: not alpine
    assert job(grid, arm).worker == "pulls"
    assert job(grid, mac).state is JobState.QUEUED
    assert plain.assigns == []


class BusyWorker(JobWorker):
    """Acknowledges its first assignment, then holds that slot: refuses `busy` as
    worker/job_runner.py does when running_count() + used_slots() >= slots (until
    ``accept``)."""

    accept = False
    accept_count = 0

    def _on_assign(self, incoming: Incoming) -> None:
        body: JobAssign = incoming.body
        with self._lock:
            self.assigns.append(body)
            first = len(self.assigns) == 1
        if first or self.accept:
            self.accept_count += not first
            self.bus.reply(incoming, Ok())
        else:
            self.bus.reply_error(incoming, "busy", f"worker {self.wid} has no free slot")


@pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)
def test_busy_refusals_do_not_fail_the_job(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = BusyWorker(grid, "w1")
    w1.join(slots=1)
    (jid,) = alice.submit({"command": "sleep 5", "max_system_retries": 3})
    (first,) = w1.assigned(1)
    wait_for(lambda: (a := grid.store.get_attempt(first.attempt)) is not None
             and a.acked_at is not None, 10, message="acknowledged")
    w1.started(first.attempt)
    w1.crash()  # declared lost (as a delayed heartbeat does), the attempt still held
    wait_for(lambda: (a := grid.store.get_attempt(first.attempt)) is not None
             and a.ended_at is not None, 10, message="ended worker_lost")
    w1.join(slots=1)  # back online, still holding the attempt
    w1.heartbeat_attempts(1, [first.attempt])
    # The job waits for the slot (queued), one system failure spent (the loss); once the
    # held attempt's (stale) report is in and the slot is free, it runs on w1. (It was
    # refused `busy` three times within milliseconds, each a system failure, and failed.)
    wait_for(lambda: len(w1.assigns) >= 2, 10, message="re-offered to w1")
    w1.report_attempt(first.attempt, "success", exit_code=0)
    w1.accept = True
    w1.heartbeat_attempts(2, [])

    def settled() -> str | None:
        record = grid.store.get_job(jid)
        assert record is not None
        return record.state.value if record.state.value in ("failed", "running") \
            and (record.state.value == "failed" or w1.accept_count) else None

    state = wait_for(settled, 10, message="the job runs again or fails")
    record = grid.store.get_job(jid)
    assert record is not None
    assert state == "running", (
        f"{state} after {record.system_failures} system failures, "
        f"{len(w1.assigns) - 2} of them `busy` refusals")
    assert record.system_failures == 1
