"""JobFuture.cancel against its own job.event (client/jobs.py).

The coordinator announces a cancel's job.event before it answers the request, so the
client's futures thread may see the job end "cancelled" before ``cancel()`` has its
reply; the future must then end cancelled, not finished with a cancelled result
(``concurrent.futures``: ``cancel()`` is True and ``result()`` raises CancelledError).
The race is forced here: the futures thread's completion runs inside the cancel request.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any

import pytest

from tests.fixtures.grid import GridHarness
from tests.job_actors import JobWorker, start_jobs_coordinator


def test_cancel_wins_over_its_own_event(grid: GridHarness,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    start_jobs_coordinator(grid)
    w1 = JobWorker(grid, "w1")
    w1.join(slots=1)
    client = grid.client("alice", "client")
    fut = client.submit("sleep 30")
    w1.assigned(1)
    store = client.jobs
    real_cancel = store.cancel

    def cancel_then_event(jobs: Any) -> dict[str, Any]:
        counts = real_cancel(jobs)
        store._complete(fut.job)  # the futures thread got there first (the event came)
        return counts

    monkeypatch.setattr(store, "cancel", cancel_then_event)
    assert fut.cancel()
    assert fut.cancelled()
    with pytest.raises(cf.CancelledError):
        fut.result(timeout=1)


def test_cancel_of_an_ended_job_keeps_its_result(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    w1 = JobWorker(grid, "w1")
    w1.join(slots=1)
    client = grid.client("alice", "client")
    fut = client.submit("true")
    (assign,) = w1.assigned(1)
    w1.report_attempt(assign.attempt, "success", exit_code=0)
    # the job ended on the grid; the future may not have seen it yet
    assert not fut.cancel()
    assert fut.result(timeout=20).state == "completed"
