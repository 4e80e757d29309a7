"""Owners' requests on their jobs: cancel, hold, release (docs/jobs.md).

Apart from coordinator/store/jobs.py because it takes the locks the other way round to
the hot path, and says so: it reads which attempts to lock first (without a lock: on
MariaDB a plain read inside the transaction would fix its snapshot before the job's lock),
locks them in id order, then the job's row, and starts again if they changed meanwhile.
That is the order of a report (attempt, then job); the reverse deadlocked (1213) a cancel
with a report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from coordinator import job_deps
from coordinator.errors import StoreError
from coordinator.job_state import JOB_MACHINE, AttemptKind, JobState
from coordinator.store import job_replicas
from coordinator.store.engine import StoreBase, op
from coordinator.store.job_records import HOLD_REASON_MAX, JobChange, _job
from coordinator.store.values import dicts, now_or

CHANGE_TRIES = 20  # a cancel reads and locks again while the job's attempts change


class JobChangeStore(StoreBase):
    """Cancel, hold and release (see the module docstring)."""

    @op
    def change_jobs(self, ids: Sequence[str], target: JobState, *, requester: str,
                    admin: bool, reason: str = "", now: float | None = None
                    ) -> tuple[list[JobChange], list[tuple[str, str]], dict[str, int]]:
        """Cancel, hold or release (``target`` cancelled, held or queued) the jobs the
        requester may change (its own; any for an admin). Returns the changes, the
        (attempt, worker) pairs to kill, and counts {changed, unchanged, unknown}.
        A job of another owner counts as unknown: nothing tells it exists."""
        t = now_or(now)
        changes: list[JobChange] = []
        kills: list[tuple[str, str]] = []
        counts = {"changed": 0, "unchanged": 0, "unknown": 0}
        for jid in dict.fromkeys(ids):
            done = None
            for _ in range(CHANGE_TRIES):  # again while its attempts change under it
                if (done := self._change_job(jid, target, requester, admin, reason, t)):
                    break
            if done is None:
                raise StoreError(f"job {jid} kept changing under a {target.value}: try again")
            counts[done[0]] += 1
            changes += done[1]
            kills += done[2]
        return changes, kills, counts

    def _change_job(self, jid: str, target: JobState, requester: str, admin: bool,
                    reason: str, t: float
                    ) -> tuple[str, list[JobChange], list[tuple[str, str]]] | None:
        """One job of ``change_jobs``: (count, changes, kills); None when one of its
        attempts ended or was assigned meanwhile. The attempts it may end are locked
        before the job (the lock order), learnt by a read before the transaction."""
        Job, Attempt = self.models.Job, self.models.Attempt
        touches = target is not JobState.QUEUED  # a release ends no attempt
        wanted = self._attempts_to_lock(jid) if touches else []
        with self.db.atomic():
            locked: dict[str, str] = {}
            for aid in wanted:  # each one live once locked: no ender waits for us
                rows = self._sql.rows("SELECT {worker_id}, {live} FROM {attempt} "
                                      "WHERE {id} = {?}{lock}", aid)
                if not rows or not rows[0]["live"]:
                    return None
                locked[aid] = str(rows[0]["worker_id"])
            rows = dicts(self._for_update(Job.select().where(Job.id == jid)))
            if not rows or (rows[0]["owner"] != requester and not admin):
                return "unknown", [], []
            job = _job(rows[0])
            sources = (frozenset({JobState.HELD}) if target is JobState.QUEUED  # release
                       else JOB_MACHINE.sources_of(target))
            if job.state not in sources:
                return "unchanged", [], []
            replicated = touches and (job.replicas > 1 or job.quorum > 1)
            running = job.current_attempt if job.state is JobState.RUNNING else None
            # MySQL's snapshot starts at this first plain read: after the job's lock,
            # which every assignment of the job holds.
            need = self._live_ids(jid) if replicated else {running} if running else set()
            if not need <= locked.keys():
                return None
            fields: dict[str, Any] = {"state": target.value, "updated_at": t}
            if target is JobState.HELD:
                fields.update(hold_reason=(reason or "held by its owner")[:HOLD_REASON_MAX],
                              hold_code="admin" if admin and job.owner != requester
                              else "user", hold_detail=f"held by {requester}")
            elif target is JobState.QUEUED:
                fields.update(hold_reason=None, hold_code=None, hold_detail=None)
            if target is JobState.CANCELLED:
                fields["ended_at"] = t
            why = f"job {target.value} by {requester}"
            kills: list[tuple[str, str]] = []
            if replicated:  # all its live replicas
                kills = job_replicas.cancel_replicas(
                    self, jid, [(a, locked[a]) for a in sorted(need)], t, why,
                    give_back=target is JobState.HELD)
            elif running:
                Attempt.update(kind=AttemptKind.CANCELLED.value, live=False, ended_at=t,
                               error=why).where((Attempt.id == running)
                                                & (Attempt.live == True)).execute()  # noqa: E712
                kills.append((running, job.worker or ""))
                if target is not JobState.CANCELLED:
                    fields.update(current_attempt=None, worker=None)
            Job.update(**fields).where((Job.id == jid)
                                       & (Job.state == job.state.value)).execute()
            changes = [JobChange(jid, job.owner, target, t, reason=reason or
                                 f"{target.value} by {requester}")]
            if target is JobState.CANCELLED:
                changes += job_deps.settle_children(self._sql, self.models, jid, target, t)
            return "changed", changes, kills

    def _attempts_to_lock(self, jid: str) -> list[str]:
        """What a cancel or hold of ``jid`` may end (a replicated job's live attempts, or
        the running one), read outside its transaction: inside, a plain read would fix
        MySQL's snapshot before the job's lock."""
        rows = self._sql.rows("SELECT {state}, {current_attempt}, {replicas}, {quorum} "
                              "FROM {job} WHERE {id} = {?}", jid)
        if rows and (rows[0]["replicas"] > 1 or rows[0]["quorum"] > 1):
            return sorted(self._live_ids(jid))
        if rows and rows[0]["current_attempt"] and rows[0]["state"] == JobState.RUNNING.value:
            return [str(rows[0]["current_attempt"])]
        return []

    def _live_ids(self, jid: str) -> set[str]:
        return {str(a) for (a,) in self._sql.tuples(
            "SELECT {id} FROM {attempt} WHERE {job_id} = {?} AND {live} = {?}", jid, True)}
