"""Per-owner reads of the job queue, for fair share and ``jobs.summary`` (docs/jobs.md,
"Fair share and locality").

The queue index of version 9, ``(state, waiting, owner, rank, submitted_at, id)``, puts
the owner right after what makes a job schedulable, so each owner's queue is one range
of it in the scheduler's order: an owner's head is one index read however many jobs the
others have queued, and the owners with queued work are found by skipping from one owner
to the next (one index probe each), never by walking 100,000 entries.
"""

from __future__ import annotations

from typing import Any

from peewee import MySQLDatabase

from coordinator.job_state import JobState
from coordinator.store.engine import StoreBase, op
from coordinator.store.job_records import JobRecord, _job

OWNER_INDEX = "xc_job_state_waiting_owner_rank_submitted_at_id"  # schema version 9
OWNERS_MAX = 10_000  # owners with queued work read in one refresh (the rest wait for the next)
SUMMARY_STATES = ("queued", "running", "held")


class JobQueueStore(StoreBase):
    """See the module docstring."""

    @op
    def queued_owners(self, limit: int = OWNERS_MAX) -> list[str]:
        """Owners with schedulable (queued, not waiting) jobs, in id order: one index
        probe per owner (a loose index scan written out)."""
        owners: list[str] = []
        queued = JobState.QUEUED.value
        rows = self._sql.tuples("SELECT MIN({owner}) FROM {job} WHERE {state} = {?} "
                                "AND {waiting} = 0", queued)
        while rows and rows[0][0] is not None and len(owners) < limit:
            owners.append(str(rows[0][0]))
            rows = self._sql.tuples("SELECT MIN({owner}) FROM {job} WHERE {state} = {?} "
                                    "AND {waiting} = 0 AND {owner} > {?}", queued, owners[-1])
        return owners

    @op
    def queued_jobs_of(self, owner: str, limit: int, offset: int = 0) -> list[JobRecord]:
        """The head of ``owner``'s own queue: priority, then submission (one index range).

        The index is named: MariaDB otherwise walks the global queue index and filters
        the owner, reading the whole queue for an owner whose jobs come last."""
        hint = (f" FORCE INDEX ({OWNER_INDEX})" if isinstance(self.db, MySQLDatabase)
                else f" INDEXED BY {OWNER_INDEX}")
        rows = self._sql.rows(
            "SELECT * FROM {job}" + hint + " WHERE {state} = {?} AND {waiting} = 0 "
            "AND {owner} = {?} "
            "ORDER BY {rank}, {submitted_at}, {id} LIMIT {?} OFFSET {?}",
            JobState.QUEUED.value, owner, int(limit), int(offset))
        return [_job(r) for r in rows]

    @op
    def queued_heads_of(self, owners: list[str], limit: int) -> dict[str, list[JobRecord]]:
        """``queued_jobs_of(owner, limit)`` for several owners in one statement per 50
        (a UNION ALL of index ranges): one round trip where a pass reaches many owners."""
        hint = (f" FORCE INDEX ({OWNER_INDEX})" if isinstance(self.db, MySQLDatabase)
                else f" INDEXED BY {OWNER_INDEX}")
        heads: dict[str, list[JobRecord]] = {o: [] for o in owners}
        for start in range(0, len(owners), 50):
            part = owners[start:start + 50]
            one = ("SELECT * FROM (SELECT * FROM {job}" + hint + " WHERE {state} = {?} AND "
                   "{waiting} = 0 AND {owner} = {?} ORDER BY {rank}, {submitted_at}, {id} "
                   "LIMIT {?}) AS {head}")
            params: list[Any] = []
            for owner in part:
                params += [JobState.QUEUED.value, owner, int(limit)]
            for row in self._sql.rows(" UNION ALL ".join([one] * len(part)), *params):
                heads[str(row["owner"])].append(_job(row))
        for jobs in heads.values():
            jobs.sort(key=lambda j: (-j.priority, j.submitted_at, j.id))
        return heads

    @op
    def live_attempts_by_owner(self) -> dict[str, int]:
        """Per owner: its live attempts (the slots it holds now). Live attempts are at
        most the grid's slots (plus prefetch), whatever the queue holds."""
        rows = self._sql.tuples("SELECT {owner}, COUNT(*) FROM {attempt} WHERE {live} = {?} "
                                "GROUP BY {owner}", True)
        return {str(o): int(n) for o, n in rows}

    @op
    def job_counts_by_owner(self, ended_since: float) -> dict[str, dict[str, int]]:
        """Per owner: jobs ``queued`` (schedulable), ``waiting`` (queued behind parents),
        ``running``, ``held``, and ``completed`` / ``failed`` since ``ended_since``.

        The live states are counted from the queue index alone; the recent endings read
        the ended jobs' rows (bounded by what the store keeps)."""
        counts: dict[str, dict[str, int]] = {}

        def add(owner: Any, key: str, n: Any) -> None:
            row = counts.setdefault(str(owner), {})
            row[key] = row.get(key, 0) + int(n)

        for state, waiting, owner, n in self._sql.tuples(
                "SELECT {state}, {waiting}, {owner}, COUNT(*) FROM {job} "
                "WHERE {state} IN ({?}, {?}, {?}) GROUP BY {state}, {waiting}, {owner}",
                *SUMMARY_STATES):
            add(owner, "waiting" if state == "queued" and waiting else str(state), n)
        for state, owner, n in self._sql.tuples(
                "SELECT {state}, {owner}, COUNT(*) FROM {job} WHERE {state} IN ({?}, {?}) "
                "AND {ended_at} >= {?} GROUP BY {state}, {owner}",
                JobState.COMPLETED.value, JobState.FAILED.value, ended_since):
            add(owner, str(state), n)
        return counts
