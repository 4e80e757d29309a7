"""Jobs no known worker could ever run (docs/jobs.md, "Why is my job not running?").

At submit, each such job is named in the reply's ``warnings`` (the job is accepted: a
worker that meets it may join soon). A job still queued ``[jobs] unmatchable_hold_s``
after its submission that no known worker (online or not) could run is held with code
``unmatchable``, so it stops waiting silently; its owner releases it when such a worker
exists. With no worker known at all nothing is held (a grid still starting). The check
runs from the scheduler's periodic pass (``UnmatchableCheck.run``): each run reads at
most ``BATCH`` old queued jobs, resuming where the last run stopped (one index walk of
the queue), and decides once per distinct set of requirements.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from coordinator import job_matching
from coordinator.job_state import JobState
from coordinator.store import Store, WorkerRecord
from coordinator.store.job_records import JobChange, JobRecord

log = logging.getLogger(__name__)

HOLD_CODE = "unmatchable"
BATCH = 500  # queued jobs looked at per run
WARNINGS_MAX = 20  # warnings in one jobs.submitted
MIN_INTERVAL_S = 0.5
MAX_INTERVAL_S = 60.0


def _signature(spec: Mapping[str, Any]) -> str:
    """What decides matching: requirements and resources (jobs alike share a verdict)."""
    return json.dumps([spec.get("requirements"), spec.get("resources")], sort_keys=True,
                      default=str)


class Verdicts:
    """``job_matching.why_nobody`` against one list of workers, once per signature."""

    def __init__(self, workers: list[WorkerRecord]) -> None:
        self.workers = workers
        self._seen: dict[str, str | None] = {}

    def why_nobody(self, spec: Mapping[str, Any]) -> str | None:
        key = _signature(spec)
        if key not in self._seen:
            self._seen[key] = job_matching.why_nobody(self.workers, spec)
        return self._seen[key]


def submit_warnings(store: Store, ids: Sequence[str], specs: Sequence[Mapping[str, Any]]
                    ) -> list[dict[str, str]]:
    """``jobs.submitted`` warnings: the jobs no known worker could run (at most
    WARNINGS_MAX; the first ones)."""
    verdicts = Verdicts(store.list_workers())
    warnings: list[dict[str, str]] = []
    for jid, spec in zip(ids, specs, strict=False):
        reason = verdicts.why_nobody(spec)
        if reason:
            warnings.append({"job": jid, "message": f"matches no known worker: {reason}"})
            if len(warnings) >= WARNINGS_MAX:
                break
    return warnings


def hold_unmatchable(store: Store, job: JobRecord, reason: str, now: float
                     ) -> JobChange | None:
    """Hold ``job`` if it is still queued (a conditional update: a racing assignment,
    cancel or hold wins); the change for its owner's job.event, or None."""
    changed = store.hold_queued(
        job.id, code=HOLD_CODE, reason=f"no known worker can run it: {reason}",
        detail="held by the coordinator: release it once such a worker exists", now=now)
    if not changed:
        return None
    return JobChange(job.id, job.owner, JobState.HELD, now, reason=f"unmatchable: {reason}")


class UnmatchableCheck:
    """Holds old queued jobs that no known worker could run (see the module docstring).
    ``hold_s`` is read on each run (a callable), so settings changed live apply."""

    def __init__(self, store: Store, hold_s: Callable[[], float],
                 announce: Callable[[list[JobChange]], None]) -> None:
        self.store = store
        self.hold_s = hold_s
        self.announce = announce
        self._due = 0.0
        self._cursor: tuple[int, float, str] | None = None  # (rank, submitted_at, id)

    def run(self, now: float) -> int:
        """One bounded run if one is due; returns the number of jobs held."""
        hold_s = self.hold_s()
        if hold_s <= 0 or now < self._due:
            return 0
        self._due = now + min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, hold_s / 4))
        jobs = self._old_queued(now - hold_s)
        workers = self.store.list_workers() if jobs else []
        if not workers:
            return 0  # nothing to judge by (a grid whose workers have not joined yet)
        verdicts = Verdicts(workers)
        changes: list[JobChange] = []
        for job in jobs:
            reason = verdicts.why_nobody(job.spec)
            if reason is None:
                continue
            change = hold_unmatchable(self.store, job, reason, now)
            if change is not None:
                log.info("job %s of %s held: no known worker can run it (%s)",
                         job.id, job.owner, reason)
                changes.append(change)
        if changes:
            self.announce(changes)
        return len(changes)

    def _old_queued(self, submitted_before: float) -> list[JobRecord]:
        """The next BATCH queued jobs submitted before the deadline, in queue order after
        the cursor (wrapping to the head when the walk reaches the end)."""
        jobs = self.store.queued_before(submitted_before, self._cursor, BATCH)
        if len(jobs) < BATCH:
            self._cursor = None  # the end: the next run starts at the head
        else:
            last = jobs[-1]
            self._cursor = (-last.priority, last.submitted_at, last.id)
        return jobs
