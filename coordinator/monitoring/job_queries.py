"""The read-only job queries of the dashboard and of ``/metrics`` (docs/monitoring.md).

The job store (``coordinator/store/jobs.py``) answers the bus's requests; what only the
monitoring needs lives here, on the same models and pooled sessions (``op``): counts by
state, the live attempts' digest, attempts ended by kind, job durations bucketed in SQL,
and the newest-first page of the Jobs view. Each is one grouped query; none returns ids
to be used as labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peewee import Case, fn

from coordinator.job_state import TERMINAL, JobState
from coordinator.store import Store
from coordinator.store.engine import op
from coordinator.store.job_records import JobRecord, _job
from coordinator.store.values import dicts, tuples

JobsDigest = tuple[tuple[Any, ...], ...]


@op
def job_state_counts(store: Store) -> dict[str, int]:
    """Jobs by state (every state present, zeros included)."""
    Job = store.models.Job
    counts = {state.value: 0 for state in JobState}
    for state, count in tuples(Job.select(Job.state, fn.COUNT(Job.id)).group_by(Job.state)):
        counts[str(state)] = int(count)
    return counts


@op
def jobs_digest(store: Store) -> JobsDigest:
    """What changes whenever a job or a live attempt moves: per job state (count, attempts
    made) and per live attempt kind (count, latest acknowledgement and start)."""
    Job, Attempt = store.models.Job, store.models.Attempt
    jobs = tuples(Job.select(Job.state, fn.COUNT(Job.id), fn.SUM(Job.attempts))
                  .group_by(Job.state).order_by(Job.state))
    live = tuples(Attempt.select(Attempt.kind, fn.COUNT(Attempt.id), fn.MAX(Attempt.acked_at),
                                 fn.MAX(Attempt.started_at))
                  .where(Attempt.live == True)  # noqa: E712
                  .group_by(Attempt.kind).order_by(Attempt.kind))
    return (*(tuple(r) for r in jobs), ("live",), *(tuple(r) for r in live))


@op
def attempts_ended_by_kind(store: Store) -> dict[str, int]:
    """Attempts that ended, by how they ended (``AttemptKind`` values)."""
    Attempt = store.models.Attempt
    query = (Attempt.select(Attempt.kind, fn.COUNT(Attempt.id))
             .where(Attempt.live == False).group_by(Attempt.kind))  # noqa: E712
    return {str(kind): int(count) for kind, count in tuples(query)}


@op
def job_duration_buckets(store: Store, bounds: Sequence[float]
                         ) -> dict[str, tuple[list[int], int, float]]:
    """Per terminal state: (jobs whose submit-to-end time is <= each bound, all of them,
    the sum of their times), counted in one query."""
    Job = store.models.Job
    duration = Job.ended_at - Job.submitted_at
    columns = [fn.SUM(Case(None, [(duration <= bound, 1)], 0)) for bound in bounds]
    query = (Job.select(Job.state, fn.COUNT(Job.id), fn.SUM(duration), *columns)
             .where(Job.state.in_([s.value for s in TERMINAL]) & Job.ended_at.is_null(False))
             .group_by(Job.state))
    out: dict[str, tuple[list[int], int, float]] = {}
    for row in tuples(query):
        state, count, total, *cumulative = row
        out[str(state)] = ([int(c or 0) for c in cumulative], int(count), float(total or 0.0))
    return out


@op
def jobs_page(store: Store, *, owner: str | None, states: Sequence[str] | None,
              before: str | None, limit: int) -> tuple[list[JobRecord], bool]:
    """Newest first: a page of jobs submitted before the cursor job ``before``; and whether
    older ones follow. ``owner`` None: everybody's."""
    Job = store.models.Job
    query = Job.select()
    if owner is not None:
        query = query.where(Job.owner == owner)
    if states:
        query = query.where(Job.state.in_(list(states)))
    if before is not None:
        cursor = tuples(Job.select(Job.submitted_at).where(Job.id == before))
        if cursor:
            at = cursor[0][0]
            query = query.where((Job.submitted_at < at)
                                | ((Job.submitted_at == at) & (Job.id < before)))
    rows = dicts(query.order_by(Job.submitted_at.desc(), Job.id.desc()).limit(limit + 1))
    return [_job(r) for r in rows[:limit]], len(rows) > limit
