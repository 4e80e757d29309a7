"""Batch jobs, their attempts and their results (docs/jobs.md).

Three tables (version 6): ``xc_job`` (what to run, where it stands), ``xc_attempt`` (one
try on one worker; its id is the fencing token) and ``xc_job_result`` (one row per
reported attempt: the primary key is the attempt id, so a re-sent report is recorded
once). Every state change is a conditional update on the transition tables of
``coordinator.job_state`` inside one transaction, so racing movers (a report and a lost
worker, a cancel and a completion) cannot both win and every job ends in exactly one
terminal state. Methods that change jobs return the ``JobChange``s they made, which the
coordinator turns into ``job.event`` messages for the owners.

Lock order (MySQL/MariaDB; SQLite's writers hold the file): attempt rows, in id order,
before their job's row. A report or an ending learns its job from the attempt it locked;
``change_jobs`` (rare; coordinator/store/job_changes.py) reads which attempts to lock
first, then checks them under the job's lock: the hot path keeps its statements. The
reverse order deadlocked (1213) a cancel with a report. Under a job's lock, its other
attempts are only inserted, read, locked with SKIP LOCKED (never waiting) or, ended,
updated (``job_replicas``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from peewee import IntegrityError, fn

from coordinator import job_deps
from coordinator.errors import InvalidArgument, NotFound
from coordinator.job_state import (
    ATTEMPT_MACHINE,
    JOB_MACHINE,
    SYSTEM_FAILURES,
    AttemptKind,
    JobState,
    Verdict,
    verdict,
)
from coordinator.store import job_replicas
from coordinator.store.engine import StoreBase, op
from coordinator.store.job_records import (
    ERROR_MAX,
    HOLD_REASON_MAX,
    AttemptRecord,
    JobChange,
    JobRecord,
    ReportOutcome,
    ResultRecord,
    _attempt,
    _input_hashes,
    _job,
    new_id,
    spec_columns,
)
from coordinator.store.values import chunks, dicts, dumps, loads, now_or, tuples

log = logging.getLogger(__name__)


_ALL = "*"


class JobStore(StoreBase):
    """Jobs, attempts and results (see the module docstring)."""

    # -- submit and read ------------------------------------------------------------------

    @op
    def submit_jobs(self, owner: str, specs: Sequence[dict[str, Any]], *,
                    now: float | None = None, admin: bool = False) -> tuple[str, list[str]]:
        """Insert ``specs`` as one batch of queued jobs, committed before returning.

        ``NotFound`` when a spec's ``after`` names a job that is not there or not the
        owner's (an ``admin`` may name anyone's); see ``coordinator.job_deps``."""
        if not specs:
            raise InvalidArgument("a submit needs at least one job")
        t = now_or(now)
        batch = new_id("b")
        rows = []
        for spec in specs:
            rows.append({"id": new_id("j"), "batch": batch, "owner": owner,
                         "state": JobState.QUEUED.value, "submitted_at": t,
                         "spec": dumps(spec), "updated_at": t, **spec_columns(spec)})
        Job, Obj, Ref = self.models.Job, self.models.DataObject, self.models.DataRef
        wanted = {jid: _input_hashes(spec) for jid, spec in zip(
            [r["id"] for r in rows], specs, strict=True)}
        parents = {r["id"]: job_deps.parents_of(spec) for r, spec in zip(rows, specs, strict=True)
                   if spec.get("after")}
        with self.db.atomic():
            edges: list[dict[str, str]] = []
            if parents:
                states = job_deps.parent_states(
                    self._sql, sorted(set().union(*parents.values())), owner=owner,
                    admin=admin)
                for row, spec in zip(rows, specs, strict=True):
                    if row["id"] in parents:
                        columns, pending = job_deps.submit_columns(spec, states, t)
                        row.update(columns, after=dumps(parents[row["id"]]))
                        edges += [{"parent": p, "child": row["id"]} for p in pending]
                # insert_many wants the same columns in every row
                rows = [{**job_deps.COLUMN_DEFAULTS, **row} for row in rows]
            for part in chunks(rows, 500):
                self._sql.insert_rows(Job, list(part))
            for part in chunks(edges, 200):
                self.models.JobEdge.insert_many(list(part)).execute()
            # Inputs stay alive while their jobs exist (refs of kind job).
            held: set[str] = set()
            for hashes in chunks(sorted(set().union(*wanted.values())), 500):
                held.update(sha for (sha,) in tuples(
                    Obj.select(Obj.sha256).where(Obj.sha256.in_(list(hashes)))))
            refs = [{"sha256": sha, "kind": "job", "ref_id": jid, "owner": owner,
                     "created_at": t} for jid, hashes in wanted.items()
                    for sha in sorted(hashes & held)]
            for part in chunks(refs, 200):
                Ref.insert_many(list(part)).execute()
        return batch, [r["id"] for r in rows]

    @op
    def get_job(self, jid: str) -> JobRecord | None:
        rows = self._sql.rows("SELECT " + _ALL + " FROM {job} WHERE {id} = {?}", jid)
        return _job(rows[0]) if rows else None

    @op
    def list_jobs(self, *, owner: str | None, state: str | None = None,
                  batch: str | None = None, after: str | None = None,
                  limit: int = 100, spec: bool = True) -> tuple[list[JobRecord], bool]:
        """A page of jobs in submission order after the cursor job ``after``; and whether
        more follow. ``spec=False`` leaves each record's spec empty, neither read nor
        decoded: a listing shows none, and decoding it was a third of a page's cost."""
        # Plain SQL (statements.py): a client waiting on a batch lists it again and
        # again, and peewee's row building was most of a 500-job page's cost.
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("owner", owner), ("state", state), ("batch", batch)):
            if value is not None:
                where.append(f"{{{column}}} = {{?}}")
                params.append(value)
        if after is not None:
            cursor = self._sql.tuples("SELECT {submitted_at} FROM {job} WHERE {id} = {?}",
                                      after)
            if cursor:
                at = cursor[0][0]
                where.append("({submitted_at} > {?} OR ({submitted_at} = {?} AND {id} > {?}))")
                params += [at, at, after]
        rows = self._sql.rows("SELECT " + (_ALL if spec else self._columns_but_spec())
                              + " FROM {job}" + (" WHERE " + " AND ".join(where) if where else "")
                              + " ORDER BY {submitted_at}, {id} LIMIT {?}",
                              *params, int(limit) + 1)
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def _columns_but_spec(self) -> str:
        """The job table's columns but ``spec``, as a statement template."""
        names = [f.column_name for f in self.models.Job._meta.sorted_fields
                 if f.column_name != "spec"]
        return ", ".join("{" + name + "}" for name in names)

    @op
    def job_attempts(self, jid: str, limit: int = 200) -> tuple[list[AttemptRecord], bool]:
        """The job's last ``limit`` attempts, oldest first; and whether older ones exist."""
        rows = self._sql.rows("SELECT * FROM {attempt} WHERE {job_id} = {?} ORDER BY "
                              "{assigned_at} DESC, {id} DESC LIMIT {?}", jid, int(limit) + 1)
        return [_attempt(r) for r in reversed(rows[:limit])], len(rows) > limit

    @op
    def get_attempt(self, aid: str) -> AttemptRecord | None:
        rows = self._sql.rows("SELECT * FROM {attempt} WHERE {id} = {?}", aid)
        return _attempt(rows[0]) if rows else None

    @op
    def job_result(self, jid: str) -> ResultRecord | None:
        """The counted result of the job, if any."""
        # (jobs.show: a client's future asks once per job; compiled, as the per-job path)
        rows = self._sql.rows("SELECT * FROM {result} WHERE {job_id} = {?} AND {counted} = {?}",
                              jid, True)
        if not rows:
            return None
        r = rows[0]
        return ResultRecord(r["attempt_id"], r["job_id"], r["kind"], True,
                            loads(r["outcome"], {}), loads(r["stdout"], None),
                            loads(r["stderr"], None), loads(r["outputs"], []))

    @op
    def result_count(self, jid: str) -> tuple[int, int]:
        """(counted, all) result rows of the job."""
        Result = self.models.JobResult
        rows = tuples(Result.select(Result.counted).where(Result.job_id == jid))
        return sum(1 for (c,) in rows if c), len(rows)

    # -- scheduling -----------------------------------------------------------------------

    @op
    def has_queued(self) -> bool:
        """Whether any job is queued (one index probe, no row decoded)."""
        return bool(self._sql.tuples("SELECT 1 FROM {job} WHERE {state} = {?} AND {waiting} = 0 "
                                     "LIMIT 1",
                                     JobState.QUEUED.value))

    @op
    def queued_jobs(self, limit: int, offset: int = 0) -> list[JobRecord]:
        """The head of the queue: priority, then submission (one index walk)."""
        rows = self._sql.rows(
            "SELECT * FROM {job} WHERE {state} = {?} AND {waiting} = 0 "
            "ORDER BY {rank}, {submitted_at}, {id} "
            "LIMIT {?} OFFSET {?}", JobState.QUEUED.value, int(limit), int(offset))
        return [_job(r) for r in rows]

    @op
    def attempt_usage(self, only: str | None = None) -> dict[str, tuple[int, int, int]]:
        """Per worker (``only`` that one: a fill reads one index range, not all live
        attempts): (live attempts, their cpus, their memory bytes)."""
        where, args = ("{live} = {?} AND {worker_id} = {?}", (True, only)) if only else (
            "{live} = {?}", (True,))
        rows = self._sql.tuples(
            "SELECT {worker_id}, COUNT({id}), SUM({cpus}), SUM({memory_bytes}) "
            "FROM {attempt} WHERE " + where + " GROUP BY {worker_id}", *args)
        return {w: (int(n), int(c or 0), int(m or 0)) for w, n, c, m in rows}

    @op
    def attempt_gpu_usage(self) -> dict[str, int]:
        """Per worker: the GPUs its live attempts hold (their jobs' ``gpus``; only
        workers holding some are listed). One grouped join over the live attempts."""
        Attempt, Job = self.models.Attempt, self.models.Job
        query = (Attempt.select(Attempt.worker_id, fn.SUM(Job.gpus))
                 .join(Job, on=(Attempt.job_id == Job.id))
                 .where((Attempt.live == True) & (Job.gpus > 0))  # noqa: E712
                 .group_by(Attempt.worker_id))
        return {w: int(n or 0) for w, n in tuples(query) if n}

    @op
    def jobs_ahead(self, job: JobRecord, limit: int) -> int:
        """Queued jobs before ``job`` in the scheduler's order (priority, submission,
        id): one walk of the queue index, at most ``limit`` + 1 rows counted."""
        rank = -job.priority
        rows = self._sql.tuples(
            "SELECT COUNT(*) FROM (SELECT 1 FROM {job} WHERE {state} = {?} AND {waiting} = 0 "
            "AND "
            "({rank} < {?} OR ({rank} = {?} AND ({submitted_at} < {?} OR "
            "({submitted_at} = {?} AND {id} < {?})))) LIMIT {?}) AS ahead",
            JobState.QUEUED.value, rank, rank, job.submitted_at, job.submitted_at, job.id,
            limit + 1)
        return int(rows[0][0]) if rows else 0

    @op
    def queued_before(self, submitted_before: float, after: tuple[int, float, str] | None,
                      limit: int) -> list[JobRecord]:
        """Queued jobs submitted before ``submitted_before``, in queue order after the
        ``after`` position (rank, submitted_at, id), at most ``limit``."""
        where = "{state} = {?} AND {waiting} = 0 AND {submitted_at} <= {?}"
        params: list[Any] = [JobState.QUEUED.value, submitted_before]
        if after is not None:
            rank, at, jid = after
            where += (" AND ({rank} > {?} OR ({rank} = {?} AND ({submitted_at} > {?} OR "
                      "({submitted_at} = {?} AND {id} > {?}))))")
            params += [rank, rank, at, at, jid]
        rows = self._sql.rows("SELECT * FROM {job} WHERE " + where +
                              " ORDER BY {rank}, {submitted_at}, {id} LIMIT {?}",
                              *params, limit)
        return [_job(r) for r in rows]

    @op
    def hold_queued(self, jid: str, *, code: str, reason: str, detail: str,
                    now: float | None = None) -> bool:
        """Hold a job the coordinator itself judged (``code``), if it is still queued: a
        conditional update, so a racing assignment, cancel or hold wins."""
        with self.db.atomic():
            return bool(self._sql.run(
                "UPDATE {job} SET {state} = {?}, {hold_code} = {?}, {hold_reason} = {?}, "
                "{hold_detail} = {?}, {updated_at} = {?} WHERE {id} = {?} AND {state} = {?}",
                JobState.HELD.value, code, reason[:HOLD_REASON_MAX], detail, now_or(now),
                jid, JobState.QUEUED.value))

    @op
    def assign_job(self, jid: str, wid: str, *, now: float | None = None
                   ) -> tuple[AttemptRecord, JobChange] | None:
        """queued -> running with a new attempt on ``wid``; None if it was not queued."""
        t = now_or(now)
        sql = self._sql
        aid = new_id("a")
        queued = JobState.QUEUED.value
        with self.db.atomic():
            rows = sql.rows("SELECT * FROM {job} WHERE {id} = {?}{lock}", jid)
            if not rows or rows[0]["state"] != queued:
                return None
            job = _job(rows[0])
            if job.replicas > 1 or job.quorum > 1:  # coordinator/store/job_replicas.py
                return job_replicas.assign_replica(self, job, wid, t)
            moved = sql.run(
                "UPDATE {job} SET {state} = {?}, {current_attempt} = {?}, {worker} = {?}, "
                "{attempts} = {attempts} + 1, {started_at} = {?}, {updated_at} = {?} "
                "WHERE {id} = {?} AND {state} = {?} AND {waiting} = 0",
                JobState.RUNNING.value, aid, wid, t, t, jid, queued)
            if not moved:
                return None
            sql.run("INSERT INTO {attempt} ({id}, {job_id}, {worker_id}, {owner}, {kind}, "
                    "{live}, {assigned_at}, {cpus}, {memory_bytes}, {missing}) "
                    "VALUES ({?}, {?}, {?}, {?}, {?}, {?}, {?}, {?}, {?}, {?})",
                    aid, jid, wid, job.owner, AttemptKind.ASSIGNED.value, True, t, job.cpus,
                    job.memory_bytes, 0)
        record = AttemptRecord(aid, jid, wid, job.owner, AttemptKind.ASSIGNED, t, None, None,
                               None, None, None)
        return record, JobChange(jid, job.owner, JobState.RUNNING, t, aid, wid)

    @op
    def acknowledge_attempt(self, aid: str, *, started: bool = False,
                            now: float | None = None) -> bool:
        """The worker persisted the assignment (or started it): assigned -> running."""
        t = now_or(now)
        sql = self._sql
        with self.db.atomic():
            changed = sql.run(
                "UPDATE {attempt} SET {acked_at} = {?}, {kind} = {?}, {missing} = 0, "
                "{started_at} = COALESCE({?}, {started_at}) "
                "WHERE {id} = {?} AND {live} = {?} AND {acked_at} IS NULL",
                t, AttemptKind.RUNNING.value, t if started else None, aid, True)
            if started and not changed:
                changed = sql.run(
                    "UPDATE {attempt} SET {started_at} = {?} "
                    "WHERE {id} = {?} AND {live} = {?} AND {started_at} IS NULL",
                    t, aid, True)
        return bool(changed)

    @op
    def acknowledge_attempts(self, aids: Sequence[str], *, now: float | None = None) -> int:
        """``acknowledge_attempt`` of several in one transaction (coordinator/assign_acks.py)."""
        t, sql = now_or(now), self._sql
        with self.db.atomic():
            return sum(sql.run("UPDATE {attempt} SET {acked_at} = {?}, {kind} = {?}, "
                               "{missing} = 0 WHERE {id} = {?} AND {live} = {?} AND "
                               "{acked_at} IS NULL", t, AttemptKind.RUNNING.value, aid, True)
                       for aid in aids)

    @op
    def live_attempts(self, wid: str | None = None) -> list[AttemptRecord]:
        Attempt = self.models.Attempt
        query = Attempt.select().where(Attempt.live == True)  # noqa: E712
        if wid is not None:
            query = query.where(Attempt.worker_id == wid)
        return [_attempt(r) for r in dicts(query.order_by(Attempt.assigned_at))]

    @op
    def unacknowledged_before(self, deadline: float) -> list[AttemptRecord]:
        """Live attempts assigned before ``deadline`` that no worker acknowledged."""
        Attempt = self.models.Attempt
        query = Attempt.select().where((Attempt.live == True)  # noqa: E712
                                       & Attempt.acked_at.is_null()
                                       & (Attempt.assigned_at < deadline))
        return [_attempt(r) for r in dicts(query)]

    @op
    def waiting_before(self, deadline: float) -> list[AttemptRecord]:
        """Live acknowledged attempts assigned before ``deadline`` whose command has not
        been seen starting: those a full worker holds waiting for a slot (prefetch)."""
        Attempt = self.models.Attempt
        query = Attempt.select().where((Attempt.live == True)  # noqa: E712
                                       & Attempt.acked_at.is_null(False)
                                       & Attempt.started_at.is_null()
                                       & (Attempt.assigned_at < deadline))
        return [_attempt(r) for r in dicts(query.order_by(Attempt.assigned_at.desc()))]

    @op
    def note_heartbeat(self, wid: str, listed: Iterable[str], *, acked_before: float,
                       now: float | None = None) -> tuple[list[tuple[str, int]], list[str]]:
        """Reconcile a heartbeat's ``attempts`` with the live attempts on ``wid``.

        Returns ([(attempt, times missing)] of acknowledged live attempts the heartbeat
        did not list (acknowledged before ``acked_before``), [listed ids that are not live
        on this worker]). Listed live attempts have their count reset; a listed attempt
        whose ok never arrived (a coordinator restart lost it) counts as acknowledged.
        """
        t = now_or(now)
        listed_set = set(listed)
        Attempt = self.models.Attempt
        # A read first: most heartbeats change nothing and must not take the write lock.
        live = tuples(Attempt.select(Attempt.id, Attempt.acked_at, Attempt.missing).where(
            (Attempt.live == True) & (Attempt.worker_id == wid)))  # noqa: E712
        missing: list[tuple[str, int]] = []
        seen: list[str] = []
        unacked: list[str] = []
        for aid, acked_at, count in live:
            if aid in listed_set:
                if count:
                    seen.append(aid)
                if acked_at is None:
                    unacked.append(aid)
            elif acked_at is not None and acked_at < acked_before:
                missing.append((aid, count + 1))
        unknown = sorted(listed_set - {aid for aid, _, _ in live})
        if not (seen or unacked or missing):
            return missing, unknown
        with self.db.atomic():
            if seen:
                Attempt.update(missing=0).where(Attempt.id.in_(seen)).execute()
            if unacked:
                Attempt.update(acked_at=t, kind=AttemptKind.RUNNING.value).where(
                    Attempt.id.in_(unacked) & Attempt.acked_at.is_null()).execute()
            for aid, count in missing:
                Attempt.update(missing=count).where(
                    (Attempt.id == aid) & (Attempt.live == True)).execute()  # noqa: E712
        return missing, unknown

    @op
    def object_sizes(self, hashes: Sequence[str]) -> dict[str, int]:
        """Sizes of the data objects held among ``hashes``."""
        Obj = self.models.DataObject
        sizes: dict[str, int] = {}
        for part in chunks(sorted(set(hashes)), 500):
            for sha, size in tuples(Obj.select(Obj.sha256, Obj.size)
                                    .where(Obj.sha256.in_(list(part)))):
                sizes[sha] = int(size)
        return sizes

    # -- endings --------------------------------------------------------------------------

    @op
    def end_attempt(self, aid: str, kind: AttemptKind, *, error: str | None = None,
                    now: float | None = None, spend: bool = True) -> list[JobChange]:
        """End a live attempt from the coordinator's side (lost worker, lease expired,
        killed); its job follows its retry budgets. Nothing if it had ended already.

        ``spend=False`` for a system failure that was the coordinator's own mistake (it
        offered a worker a slot the worker did not have): the job is queued again and no
        budget is spent."""
        with self.db.atomic():
            return self._end(aid, kind, now_or(now), None, error, spend=spend)

    def _end(self, aid: str, kind: AttemptKind, t: float, exit_code: int | None,
             error: str | None, *, spend: bool = True,
             locked: dict[str, Any] | None = None, started_at: float | None = None,
             acked_at: float | None = None,
             report: dict[str, Any] | None = None) -> list[JobChange]:
        """``locked``: the attempt's row when the caller has already read it for update
        in this transaction (one query fewer on a report). ``started_at``: when the
        worker says the command started (a short job sends no attempt.started);
        ``acked_at``: when the worker acknowledged it, if it had not yet (a report).
        ``report``: a report's fields, which a replicated job's quorum records itself."""
        sql = self._sql
        rows = [locked] if locked is not None else sql.rows(
            "SELECT * FROM {attempt} WHERE {id} = {?}{lock}", aid)
        if not rows or not rows[0]["live"]:
            return []
        attempt = _attempt(rows[0])
        ATTEMPT_MACHINE.check(aid, attempt.kind, kind)
        sql.run("UPDATE {attempt} SET {kind} = {?}, {live} = {?}, {ended_at} = {?}, "
                "{exit_code} = {?}, {error} = {?}, {started_at} = COALESCE({started_at}, {?}), "
                "{acked_at} = COALESCE({acked_at}, {?}) WHERE {id} = {?} AND {live} = {?}",
                kind.value, False, t, exit_code, (error or None) and error[:ERROR_MAX],
                started_at, acked_at, aid, True)
        jobs = sql.rows("SELECT * FROM {job} WHERE {id} = {?}{lock}", attempt.job_id)
        if not jobs:
            return []
        job = _job(jobs[0])
        if job.replicas > 1 or job.quorum > 1:  # the quorum decides (job_replicas.py)
            return job_replicas.end_replica(self, attempt, job, kind, t, exit_code,
                                            spend=spend, report=report)
        if job.current_attempt != aid or job.state is not JobState.RUNNING:
            return []  # the job moved on (cancelled, held): this attempt decides nothing
        stop = frozenset(int(c) for c in job.spec.get("stop_exit_codes") or ())
        if not spend and kind in SYSTEM_FAILURES:
            v = Verdict(JobState.QUEUED, None, f"{kind.value}: offered again (not counted)")
        else:
            v = verdict(kind, exit_code, system_failures=job.system_failures,
                        job_failures=job.job_failures,
                        max_system_retries=job.max_system_retries,
                        max_retries=job.max_retries, stop_exit_codes=stop)
        JOB_MACHINE.check(job.id, job.state, v.state)
        sets = "{state} = {?}, {updated_at} = {?}, {exit_code} = {?}"
        params: list[Any] = [v.state.value, t, exit_code]
        if v.spent == "system":
            sets += ", {system_failures} = {system_failures} + 1"
        elif v.spent == "job":
            sets += ", {job_failures} = {job_failures} + 1"
        if v.state is JobState.QUEUED:
            sets += ", {current_attempt} = NULL, {worker} = NULL"
        else:
            sets += ", {ended_at} = {?}"
            params.append(t)
        sql.run("UPDATE {job} SET " + sets + " WHERE {id} = {?} AND {state} = {?}",
                *params, job.id, JobState.RUNNING.value)
        change = JobChange(job.id, job.owner, v.state, t, aid, attempt.worker_id, exit_code,
                           v.reason or kind.value)
        if v.state in (JobState.COMPLETED, JobState.FAILED) and sql.tuples(
                "SELECT 1 FROM {edges} WHERE {parent} = {?} LIMIT 1", job.id):
            # (probed here in plain SQL: most jobs have no children, and settling builds
            # its queries with peewee, a few hundred µs per ending)
            return [change, *job_deps.settle_children(sql, self.models, job.id, v.state, t)]
        return [change]

    @op
    def record_report(self, aid: str, wid: str, kind: AttemptKind, *,
                      outcome: dict[str, Any], stdout: dict[str, Any] | None,
                      stderr: dict[str, Any] | None, outputs: list[dict[str, Any]],
                      started_at: float | None, ended_at: float | None,
                      now: float | None = None) -> ReportOutcome:
        """Record an attempt's report once and, if the attempt is its job's current
        one, end it and decide the job, all in one transaction (durable before ok).

        ``NotFound`` for an unknown attempt, or one that is not ``wid``'s (nothing is
        written then). A duplicate changes nothing; a stale attempt's report is recorded
        (kind stale, not counted).
        """
        t = now_or(now)
        sql = self._sql
        try:
            with self.db.atomic():
                rows = sql.rows("SELECT * FROM {attempt} WHERE {id} = {?}{lock}", aid)
                if not rows:
                    raise NotFound(f"no attempt {aid}")
                attempt = _attempt(rows[0])
                if attempt.worker_id != wid:
                    raise NotFound(f"no attempt {aid} on worker {wid}")
                # A duplicate needs no lookup: a recorded report ended its attempt (or
                # found it ended), so nothing below changes, and the result row's
                # primary key refuses it (IntegrityError, rolled back, answered below).
                report = {"outcome": outcome, "stdout": stdout, "stderr": stderr,
                          "outputs": outputs, "started_at": started_at, "ended_at": ended_at}
                # With no ok first, the report acknowledges the assignment as well (a
                # worker holds its ok back briefly: worker/assign_answers.py): acked_at.
                changes = self._end(aid, kind, t, outcome.get("exit_code"),
                                    outcome.get("error"), locked=rows[0],
                                    started_at=started_at, acked_at=t,
                                    report=report) if attempt.kind.live else []
                if report.get("handled"):  # a replica: recorded by its quorum
                    return ReportOutcome(recorded=True, counted=bool(report.get("counted")),
                                         changes=tuple(changes))
                counted = bool(changes)
                sql.run("INSERT INTO {result} ({attempt_id}, {job_id}, {worker_id}, {kind}, "
                        "{counted}, {outcome}, {stdout}, {stderr}, {outputs}, {started_at}, "
                        "{ended_at}, {recorded_at}) VALUES ({?}, {?}, {?}, {?}, {?}, {?}, "
                        "{?}, {?}, {?}, {?}, {?}, {?})",
                        aid, attempt.job_id, wid,
                        kind.value if counted else AttemptKind.STALE.value, counted,
                        dumps({**outcome, "kind": kind.value}),
                        dumps(stdout) if stdout else None, dumps(stderr) if stderr else None,
                        dumps(outputs), started_at, ended_at, t)
                if counted:
                    self._keep_results(attempt.job_id, attempt.owner, stdout, stderr,
                                       outputs, t)
                return ReportOutcome(recorded=True, counted=counted, changes=tuple(changes))
        except IntegrityError:
            return ReportOutcome(recorded=False, counted=False)  # a racing duplicate

    def _keep_results(self, jid: str, owner: str, stdout: dict[str, Any] | None,
                      stderr: dict[str, Any] | None, outputs: list[dict[str, Any]],
                      t: float) -> None:
        """``xc_data_ref`` rows of kind job keep the result objects from collection."""
        sql = self._sql
        hashes = {ref["sha256"] for ref in [stdout, stderr, *outputs]
                  if isinstance(ref, dict) and isinstance(ref.get("sha256"), str)}
        for sha in sorted(hashes):
            if not sql.tuples("SELECT 1 FROM {objects} WHERE {sha256} = {?}", sha):
                continue
            if not sql.tuples("SELECT 1 FROM {refs} WHERE {sha256} = {?} AND {kind} = 'job' "
                              "AND {ref_id} = {?}", sha, jid):
                sql.run("INSERT INTO {refs} ({sha256}, {kind}, {ref_id}, {owner}, "
                        "{created_at}) VALUES ({?}, 'job', {?}, {?}, {?})", sha, jid, owner, t)
