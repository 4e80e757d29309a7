"""The data rights that batch jobs give workers (docs/jobs.md, docs/data.md): which
objects a worker may fetch (a live job's stdin, inputs and app binaries, or what the
holder of its active reservation may read) and which attempts it may upload results for.
A question of rights, not of the jobs' states: kept apart from their changes
(coordinator/store/jobs.py)."""

from __future__ import annotations

from broker.acl import Role
from coordinator.reservation_state import ReservationState
from coordinator.store.data import _entry as data_entry
from coordinator.store.engine import StoreBase, op
from coordinator.store.job_records import _input_hashes
from coordinator.store.values import loads, tuples


class JobRightStore(StoreBase):
    """What jobs let a worker read and write (see the module docstring)."""

    @op
    def worker_may_read(self, wid: str, sha256: str) -> bool:
        """Is ``sha256`` the stdin, an input or an app binary of a job live on ``wid``, or
        readable by the holder of the active reservation on ``wid`` (``workdir.fetch``)?"""
        if self._holder_may_read(wid, sha256):
            return True
        Job, Attempt = self.models.Job, self.models.Attempt
        query = (Job.select(Job.spec).join(Attempt, on=(Attempt.job_id == Job.id))
                 .where((Attempt.live == True) & (Attempt.worker_id == wid)))  # noqa: E712
        # stdin, inputs and an app job's binaries (job_records._input_hashes)
        return any(sha256 in _input_hashes(loads(text, {})) for (text,) in tuples(query))

    def _holder_may_read(self, wid: str, sha256: str) -> bool:
        """The data rights of ``DataRecord.readable_by`` (owner, shared, public) or an
        admin's, for the principal holding ``wid``'s active reservation (unique index)."""
        Res, Entry, Principal = (self.models.Reservation, self.models.DataEntry,
                                 self.models.Principal)
        rows = tuples(Res.select(Res.client_id, Principal.role)
                      .join(Principal, on=(Principal.id == Res.client_id))
                      .where((Res.active_worker == wid)
                             & (Res.state == ReservationState.ACTIVE.value)
                             & Principal.revoked_at.is_null()))
        if not rows:
            return False
        holder, role = rows[0]
        if role == Role.ADMIN.value:  # as open_fetch serves an admin any object
            return bool(Entry.select().where(Entry.sha256 == sha256).exists())
        entries = Entry.select().where(Entry.sha256 == sha256)  # indexed
        return any(data_entry(row).readable_by(holder) for row in entries)

    @op
    def attempt_grant(self, aid: str, wid: str) -> tuple[str, str] | None:
        """(job id, owner) of ``aid`` when it is live on ``wid``, else None: a worker
        may upload results for its current attempts only."""
        rows = self._sql.tuples(  # (every upload and report with results asks: compiled)
            "SELECT {job_id}, {owner} FROM {attempt} WHERE {id} = {?} AND {worker_id} = {?} "
            "AND {live} = {?}", aid, wid, True)
        return (str(rows[0][0]), str(rows[0][1])) if rows else None
