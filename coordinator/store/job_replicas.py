"""Replicated jobs in the store (docs/jobs.md, "Replicas and quorum"): placing a replica,
ending one (the quorum's verdict), cancelling them all, and the workers' trust.

The functions run inside ``coordinator.store.jobs``'s transactions, after the job's row
was read for update, so two replicas' reports of one job are decided one after the other.
``ReplicaStore`` adds the reads the scheduler and the requests need. The quorum logic
itself is ``coordinator.job_replicas`` (pure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coordinator import job_deps
from coordinator.job_replicas import (
    UNTRUSTED_AFTER,
    Decision,
    Vote,
    decide,
    max_attempts,
    signature,
)
from coordinator.job_state import (
    ATTEMPT_MACHINE,
    JOB_FAILURES,
    JOB_MACHINE,
    RESULTS,
    SYSTEM_FAILURES,
    AttemptKind,
    JobState,
)
from coordinator.store.engine import StoreBase, op
from coordinator.store.job_records import (
    HOLD_REASON_MAX,
    AttemptRecord,
    JobChange,
    JobRecord,
    _job,
    new_id,
)
from coordinator.store.values import dumps, loads, now_or, tuples

if TYPE_CHECKING:
    from coordinator.store.jobs import JobStore

NO_QUORUM = "no_quorum"  # the hold code a failed replicated job carries as its reason's tag


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What the scheduler needs to place a replicated job's next attempts."""

    more: int  # attempts it wants placed now
    workers: frozenset[str]  # workers it may not use again (live attempt, or a result)
    untrusted: frozenset[str]  # workers offered no replicated work
    veterans: frozenset[str] = frozenset()  # may run it alone (adaptive_after), first


@dataclass(frozen=True, slots=True)
class Trust:
    """A worker's record as a replica runner."""

    valid: int = 0
    invalid: int = 0

    @property
    def trusted(self) -> bool:
        return self.invalid < UNTRUSTED_AFTER

    def as_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "invalid": self.invalid, "trusted": self.trusted}


class _Facts:
    """A replicated job's attempts and results, read in one transaction."""

    def __init__(self, store: StoreBase, jid: str) -> None:
        sql = store._sql
        self.job = jid
        # Plain reads, after the job's row was locked: every writer of this job's replica
        # rows holds that lock first, and MySQL's snapshot starts at the first plain read,
        # so they see every committed change. (Locking reads here would take the
        # attempts' locks in the opposite order of a report's: deadlocks.)
        self.attempts = sql.rows("SELECT {id}, {worker_id}, {kind}, {live} FROM {attempt} "
                                 "WHERE {job_id} = {?}", jid)
        self.results = sql.rows(
            "SELECT {attempt_id}, {worker_id}, {kind}, {outcome}, {stdout}, {outputs} "
            "FROM {result} WHERE {job_id} = {?} ORDER BY {recorded_at}, {attempt_id}", jid)
        self.live = [a for a in self.attempts if a["live"]]
        workers = sorted({r["worker_id"] for r in self.results})
        self.trust = trust_of(store, workers)

    def votes(self) -> list[Vote]:
        votes = []
        for r in self.results:
            kind = AttemptKind(r["kind"]) if r["kind"] in AttemptKind._value2member_map_ \
                else AttemptKind.STALE
            if kind not in RESULTS:
                continue
            outcome = loads(r["outcome"], {})
            if kind is AttemptKind.SUCCESS and not isinstance(outcome.get("exit_code"), int):
                outcome = {**outcome, "exit_code": 0}
            votes.append(Vote(r["attempt_id"], r["worker_id"],
                              signature(outcome, loads(r["stdout"], None),
                                        loads(r["outputs"], [])),
                              self.trust.get(r["worker_id"], Trust()).trusted))
        return votes

    def taken(self) -> frozenset[str]:
        """Workers with a live attempt or a comparable result of the job."""
        return frozenset({a["worker_id"] for a in self.live}
                         | {r["worker_id"] for r in self.results if r["kind"] in
                            {k.value for k in (*RESULTS, AttemptKind.INVALID)}})

    def decide(self, job: JobRecord, issued: int) -> Decision:
        return decide(replicas=job.replicas, quorum=job.quorum, issued=issued,
                      bound=max_attempts(job.spec, job.replicas, job.quorum),
                      live=len(self.live), votes=self.votes())


def trust_of(store: StoreBase, workers: list[str]) -> dict[str, Trust]:
    if not workers:
        return {}
    T = store.models.WorkerTrust
    return {w: Trust(int(v), int(i)) for w, v, i in
            tuples(T.select(T.worker_id, T.valid, T.invalid).where(T.worker_id.in_(workers)))}


def _count(store: StoreBase, wid: str, *, valid: int = 0, invalid: int = 0, t: float) -> None:
    T = store.models.WorkerTrust
    T.insert(worker_id=wid, valid=0, invalid=0, updated_at=t).on_conflict_ignore().execute()
    T.update(valid=T.valid + valid, invalid=T.invalid + invalid, updated_at=t).where(
        T.worker_id == wid).execute()


def assign_replica(store: StoreBase, job: JobRecord, wid: str, t: float
                   ) -> tuple[AttemptRecord, JobChange] | None:
    """One more attempt of a queued replicated job (its row locked) on ``wid``; None when
    it wants none, or ``wid`` already has one of its attempts or results, or is untrusted."""
    facts = _Facts(store, job.id)
    if wid in facts.taken() or not trust_of(store, [wid]).get(wid, Trust()).trusted:
        return None
    decision = facts.decide(job, job.attempts)
    if decision.more <= 0:
        return None
    state = JobState.QUEUED if decision.more > 1 else JobState.RUNNING
    sql, aid = store._sql, new_id("a")
    alone = not facts.attempts and wid in veterans(store, job)
    if alone:  # adaptive: a worker with a clean record runs it alone
        state = JobState.RUNNING
    if not sql.run("UPDATE {job} SET {state} = {?}, {current_attempt} = {?}, {worker} = {?}, "
                   "{attempts} = {attempts} + 1, {started_at} = COALESCE({started_at}, {?}), "
                   "{updated_at} = {?} WHERE {id} = {?} AND {state} = {?} AND {waiting} = 0",
                   state.value, aid, wid, t, t, job.id, JobState.QUEUED.value):
        return None  # still waiting for parents (after): nothing written
    if alone:  # it is an ordinary job from now on
        sql.run("UPDATE {job} SET {replicas} = 1, {quorum} = 1 WHERE {id} = {?}", job.id)
    sql.run("INSERT INTO {attempt} ({id}, {job_id}, {worker_id}, {owner}, {kind}, "
            "{live}, {assigned_at}, {cpus}, {memory_bytes}, {missing}) "
            "VALUES ({?}, {?}, {?}, {?}, {?}, {?}, {?}, {?}, {?}, {?})",
            aid, job.id, wid, job.owner, AttemptKind.ASSIGNED.value, True, t, job.cpus,
            job.memory_bytes, 0)
    record = AttemptRecord(aid, job.id, wid, job.owner, AttemptKind.ASSIGNED, t, None, None,
                           None, None, None)
    reason = (f"adaptive: {wid} has a clean record, it runs the job alone" if alone else
              f"replica {len(facts.live) + 1} of {job.replicas} running")
    return record, JobChange(job.id, job.owner, state, t, aid, wid, reason=reason)


def veterans(store: StoreBase, job: JobRecord) -> frozenset[str]:
    """Workers that may run ``job`` unreplicated (its ``adaptive_after``: at least that
    many valid results and no invalid one); none when the job does not ask."""
    after = job.spec.get("adaptive_after")
    if not isinstance(after, int) or after < 1:
        return frozenset()
    T = store.models.WorkerTrust
    return frozenset(w for (w,) in tuples(T.select(T.worker_id).where(
        (T.valid >= after) & (T.invalid == 0))))


def end_replica(store: JobStore, attempt: AttemptRecord, job: JobRecord, kind: AttemptKind,
                t: float, exit_code: int | None, *, spend: bool,
                report: dict[str, Any] | None) -> list[JobChange]:
    """An attempt of a replicated job ended (its row already updated): record its report
    (never counted yet), then let the quorum decide the job."""
    sql = store._sql
    if report is not None:
        report["handled"] = True
        sql.run("INSERT INTO {result} ({attempt_id}, {job_id}, {worker_id}, {kind}, "
                "{counted}, {outcome}, {stdout}, {stderr}, {outputs}, {started_at}, "
                "{ended_at}, {recorded_at}) VALUES ({?}, {?}, {?}, {?}, {?}, {?}, "
                "{?}, {?}, {?}, {?}, {?}, {?})",
                attempt.id, job.id, attempt.worker_id, kind.value, False,
                dumps({**report["outcome"], "kind": kind.value}),
                dumps(report["stdout"]) if report["stdout"] else None,
                dumps(report["stderr"]) if report["stderr"] else None,
                dumps(report["outputs"]), report["started_at"], report["ended_at"], t)
    if job.state not in (JobState.QUEUED, JobState.RUNNING):
        return []  # held or ended meanwhile: this attempt decides nothing
    sets, params = "{updated_at} = {?}", list[Any]([t])
    issued = job.attempts
    if not spend and kind in SYSTEM_FAILURES:
        sets += ", {attempts} = {attempts} - 1"  # the coordinator's miscount: given back
        issued -= 1
    elif kind in SYSTEM_FAILURES or kind is AttemptKind.CANCELLED:
        sets += ", {system_failures} = {system_failures} + 1"
    elif kind in JOB_FAILURES:
        sets += ", {job_failures} = {job_failures} + 1"
    facts = _Facts(store, job.id)
    decision = facts.decide(job, issued)
    state = decision.state
    if state is not job.state:
        JOB_MACHINE.check(job.id, job.state, state)
    sets += ", {state} = {?}"
    params.append(state.value)
    change = JobChange(job.id, job.owner, state, t, attempt.id, attempt.worker_id, exit_code,
                       decision.reason or kind.value)
    changes: list[JobChange] = [change] if state is not job.state else []
    if state.terminal:
        canonical = decision.canonical
        _close_live(store, facts, t, "its job's quorum was decided" if canonical
                    else "its job has no quorum")
        sets += ", {ended_at} = {?}"
        params.append(t)
        if canonical is not None:
            code = canonical.signature[0]
            sets += ", {exit_code} = {?}, {current_attempt} = {?}, {worker} = {?}"
            params += [code, canonical.attempt, canonical.worker]
            _judge(store, job, facts, canonical, t)
            if report is not None:
                report["counted"] = canonical.attempt == attempt.id
            changes = [JobChange(job.id, job.owner, state, t, canonical.attempt,
                                 canonical.worker, code, decision.reason)]
        else:
            sets += ", {hold_code} = {?}, {hold_reason} = {?}"
            params += [NO_QUORUM, decision.reason[:HOLD_REASON_MAX]]
    sql.run("UPDATE {job} SET " + sets + " WHERE {id} = {?} AND {state} = {?}",
            *params, job.id, job.state.value)
    if state in (JobState.COMPLETED, JobState.FAILED):
        changes += job_deps.settle_children(sql, store.models, job.id, state, t)
    return changes


def _judge(store: JobStore, job: JobRecord, facts: _Facts, canonical: Vote, t: float) -> None:
    """The canonical result counts; each replica result is valid (agrees) or invalid, and
    its worker's trust counted so."""
    sql = store._sql
    sql.run("UPDATE {result} SET {counted} = {?} WHERE {attempt_id} = {?}", True,
            canonical.attempt)
    counts: dict[str, list[int]] = {}
    for vote in facts.votes():
        tally = counts.setdefault(vote.worker, [0, 0])
        if vote.signature == canonical.signature:
            tally[0] += 1
            continue
        tally[1] += 1
        # The attempt first, then its result: a re-sent report locks them in that order.
        rows = sql.tuples("SELECT {kind} FROM {attempt} WHERE {id} = {?}", vote.attempt)
        if rows and rows[0][0] in {k.value for k in RESULTS}:
            ATTEMPT_MACHINE.check(vote.attempt, AttemptKind(rows[0][0]), AttemptKind.INVALID)
            sql.run("UPDATE {attempt} SET {kind} = {?}, {error} = {?} WHERE {id} = {?}",
                    AttemptKind.INVALID.value, "outvoted by its job's quorum", vote.attempt)
        sql.run("UPDATE {result} SET {kind} = {?} WHERE {attempt_id} = {?}",
                AttemptKind.INVALID.value, vote.attempt)
    for wid in sorted(counts):  # one order for every transaction: no deadlock
        _count(store, wid, valid=counts[wid][0], invalid=counts[wid][1], t=t)
    row = sql.rows("SELECT {stdout}, {stderr}, {outputs} FROM {result} "
                   "WHERE {attempt_id} = {?}", canonical.attempt)
    if row:
        store._keep_results(job.id, job.owner, loads(row[0]["stdout"], None),
                            loads(row[0]["stderr"], None), loads(row[0]["outputs"], []), t)


def _unlocked_live(store: StoreBase, jid: str) -> list[tuple[str, str]]:
    """The job's live attempts, locked for update but for those another transaction
    holds (MySQL: SKIP LOCKED). This transaction holds the job's row; those are a report,
    an ending or a cancel on its way, which lock attempts before the job (the lock order,
    coordinator/store/jobs.py): waiting for them would deadlock. They find the job
    decided; a skipped attempt ends with its worker's report, which counts nothing."""
    lock = store._sql.sql("{lock}")
    return [(str(a), str(w)) for a, w in store._sql.tuples(
        "SELECT {id}, {worker_id} FROM {attempt} WHERE {job_id} = {?} AND {live} = {?}"
        + (lock + " SKIP LOCKED" if lock else ""), jid, True)]


def _close(store: StoreBase, live: list[tuple[str, str]], t: float, why: str) -> None:
    for aid, _wid in live:
        store._sql.run("UPDATE {attempt} SET {kind} = {?}, {live} = {?}, {ended_at} = {?}, "
                       "{error} = {?} WHERE {id} = {?} AND {live} = {?}",
                       AttemptKind.CANCELLED.value, False, t, why, aid, True)


def _close_live(store: StoreBase, facts: _Facts, t: float, why: str) -> None:
    """End the job's other live attempts (their workers are told by the heartbeat
    reconciliation, which kills what is no longer live)."""
    if facts.live:
        _close(store, _unlocked_live(store, facts.job), t, why)


def cancel_replicas(store: StoreBase, jid: str, live: list[tuple[str, str]], t: float,
                    why: str, *, give_back: bool) -> list[tuple[str, str]]:
    """End every live attempt of a replicated job (cancel, hold): ``live``, the (attempt,
    worker) pairs the caller locked before the job's row (the lock order, so a replica's
    report is waited for, not skipped); returned to send ``job.kill``. ``give_back`` (a
    hold): they spend nothing of the bound."""
    if give_back and live:
        store._sql.run("UPDATE {job} SET {attempts} = {attempts} - {?} WHERE {id} = {?}",
                       len(live), jid)
    _close(store, live, t, why)
    return live


class ReplicaStore(StoreBase):
    """The reads of replicated jobs and trust (module docstring)."""

    @op
    def replica_view(self, jid: str) -> ReplicaView:
        rows = self._sql.rows("SELECT * FROM {job} WHERE {id} = {?}", jid)
        if not rows or rows[0]["state"] != JobState.QUEUED.value:
            return ReplicaView(0, frozenset(), frozenset())
        job = _job(rows[0])
        facts = _Facts(self, jid)
        return ReplicaView(facts.decide(job, job.attempts).more, facts.taken(),
                           self.untrusted_workers(),
                           veterans(self, job) if not facts.attempts else frozenset())

    @op
    def untrusted_workers(self) -> frozenset[str]:
        T = self.models.WorkerTrust
        return frozenset(w for (w,) in tuples(T.select(T.worker_id).where(
            T.invalid >= UNTRUSTED_AFTER)))

    @op
    def worker_trust(self, wid: str) -> Trust:
        """A worker's valid and invalid replica results (all zero if it ran none)."""
        return trust_of(self, [wid]).get(wid, Trust())

    @op
    def forget_trust(self, wid: str, *, now: float | None = None) -> None:
        """An admin's pardon: the worker's counts start again from zero."""
        T = self.models.WorkerTrust
        T.update(valid=0, invalid=0, updated_at=now_or(now)).where(
            T.worker_id == wid).execute()
