"""Attempts driven from the executor's I/O loop (worker/job_runner.py, issue 13).

A running command holds no thread of the job runner: its exit comes back through
``Executor.notify_exit`` and its ``attempt.started`` and wall clock are timers on the
loop; only the attempt's start and its end (outcome, delivery) take a reused thread.
Against the stand-in coordinator of tests/test_job_runner.py (real broker, real worker).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from schemas.job_messages import JobKill
from schemas.messages import Ok
from tests.fixtures.grid import WorkerHandle
from tests.fixtures.services import wait_for
from tests.test_job_runner import StandIn, standin  # noqa: F401 - the fixture
from worker.executors.base import SessionHandle
from worker.job_runner import JobRunner


def runner_of(worker: WorkerHandle) -> JobRunner:
    assert worker.agent is not None
    wait_for(lambda: worker.agent is not None and worker.agent.jobs is not None, timeout=10,
             message="the job runner")
    assert worker.agent.jobs is not None
    return worker.agent.jobs


def busy_job_threads(runner: JobRunner) -> int:
    """Threads of the runner's pool that are not idle (busy with a call)."""
    alive = sum(1 for t in threading.enumerate() if t.name.startswith(
        f"{runner._threads.name}-"))
    return alive - runner._threads.idle


def test_running_commands_hold_no_thread_and_still_stop(
        standin: tuple[StandIn, WorkerHandle]) -> None:  # noqa: F811
    coord, worker = standin
    runner = runner_of(worker)
    attempts = [coord.assign("sleep 60") for _ in range(4)]  # the 4 slots
    wait_for(lambda: set(attempts) <= set(coord.started), timeout=20,
             message="every attempt.started (a loop timer)")
    # Four commands run; no thread of the runner waits for any of them (before: one each).
    wait_for(lambda: busy_job_threads(runner) == 0, timeout=10,
             message="no job thread busy while the commands run")
    assert runner.running_count() == 4
    assert all(a.task is not None and a.exit is None for a in runner.all())
    for attempt in attempts:  # job.kill still stops each
        reply = coord.bus.request(coord.worker_inbox, JobKill(attempt=attempt, reason="x"),
                                  timeout=10)
        assert isinstance(reply.body, Ok)
    for attempt in attempts:
        assert coord.report(attempt).kind == "cancelled"
    overdue = coord.assign("sleep 60", wall_s=1)  # the wall clock, a loop timer
    report = coord.report(overdue)
    assert report.kind == "wall_clock", report
    assert report.timed_out


def test_sequential_jobs_reuse_the_pools_threads(
        standin: tuple[StandIn, WorkerHandle]) -> None:  # noqa: F811
    coord, worker = standin
    runner = runner_of(worker)
    first = coord.assign("true")
    assert coord.report(first).kind == "success"
    made = runner._threads._made
    for i in range(50):
        attempt = coord.assign(f"echo {i}")
        report = coord.report(attempt)
        assert report.kind == "success", (i, report)
        assert coord.data(report.stdout) == f"{i}\n".encode()
    # A thread per attempt would make 50 more; a few at most come from overlaps (a close
    # of one attempt beside the start of the next).
    assert runner._threads._made - made <= 4


def test_an_acknowledged_report_leaves_the_directory_to_the_sessions_close(
        standin: tuple[StandIn, WorkerHandle],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The session is closed after the report is on its way: an acknowledgement that comes
    first must not remove the attempt's directory (the work dir is in it) under the close;
    the close removes it when done."""
    coord, worker = standin
    runner = runner_of(worker)
    executor = runner.executor_for("process")
    release = threading.Event()
    closing: list[tuple[str, bool]] = []
    close_session = executor.close_session

    def held_close(handle: SessionHandle) -> None:
        assert release.wait(30)
        closing.append((handle.session_id, Path(handle.workdir).is_dir()))
        close_session(handle)

    monkeypatch.setattr(executor, "close_session", held_close)
    try:
        attempt = coord.assign("echo kept > made-here")  # nothing to upload: closed after
        assert coord.report(attempt).kind == "success"
        wait_for(lambda: runner._attempt(attempt) is None, timeout=10,
                 message="the acknowledgement handled")
        directory = worker.state_dir / "jobs" / attempt
        assert (directory / "work" / "made-here").is_file()  # the close has not run yet
    finally:
        release.set()
    wait_for(lambda: not directory.exists(), timeout=10, message="the directory removed")
    assert closing == [(attempt, True)]
