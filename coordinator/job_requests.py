"""The batch-job requests (docs/jobs.md): owners submit, list, show, cancel, hold and
release jobs; workers say an attempt started and report how it ended.

Each handler is admitted by the request guard first (``broker.request_roles``: people for
``jobs.*``, workers for ``attempt.*``, rate-limited) and answers once. A principal sees
and changes only its own jobs (an admin: anyone's); someone else's job is "not found",
never "forbidden", so ids do not leak. A worker may speak only of its own attempts:
another worker's attempt is "not found" and nothing changes. ``attempt.report`` is
answered ok only after its result row is committed (the worker re-sends until then); a
re-sent report is answered ok and recorded once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from broker.acl import Role
from broker.bus import Bus, Incoming, Lane
from coordinator import job_apps, job_deps
from coordinator.data_sink import DataSink
from coordinator.errors import NotFound
from coordinator.fair_share import RECENT_S, summary_rows
from coordinator.handling import Refusal, RequestGuard, guarded
from coordinator.inline_results import keep_inline
from coordinator.job_replicas import check_spec as replica_problem
from coordinator.job_state import REPORTABLE, AttemptKind, JobState
from coordinator.job_unmatchable import submit_warnings
from coordinator.job_why import explain
from coordinator.scheduler import JobScheduler
from coordinator.store import Store
from coordinator.store.data import valid_sha256
from coordinator.store.job_records import AttemptRecord, JobRecord, ResultRecord
from schemas.job_messages import (
    AttemptRecorded,
    AttemptReport,
    AttemptStarted,
    JobsCancel,
    JobsHold,
    JobsList,
    JobsListReply,
    JobsRelease,
    JobsShow,
    JobsShowReply,
    JobsSubmit,
    JobsSubmitted,
    JobsSummary,
    JobsSummaryReply,
    JobsWhy,
    JobsWhyReply,
)
from schemas.messages import Body, Ok
from schemas.outcome import ERROR_MAX, OUTCOME_FIELDS

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
REPLY_OVERHEAD = 1024
SHOW_ATTEMPTS = 200


def job_summary(job: JobRecord) -> dict[str, Any]:
    """jobs.list.reply.json#/definitions/job_summary"""
    item: dict[str, Any] = {
        "id": job.id, "name": job.name, "batch": job.batch, "state": job.state.value,
        "owner": job.owner, "attempts": job.attempts, "exit_code": job.exit_code,
        "submitted_at": job.submitted_at, "ended_at": job.ended_at,
        "hold_reason": job.hold_reason}
    if job.worker:
        item["worker"] = job.worker
    if job.state is JobState.QUEUED and job.waiting:  # after: the HOLD column says why
        item["hold_reason"] = f"waiting for {job.waiting} parent job(s)"
    return item


def job_detail(job: JobRecord, result: ResultRecord | None) -> dict[str, Any]:
    """jobs.show.reply.json#/definitions/job_detail"""
    item = job_summary(job)
    item.update(spec=job.spec, priority=job.priority, started_at=job.started_at,
                hold_code=job.hold_code, hold_detail=job.hold_detail,
                system_failures=job.system_failures, job_failures=job.job_failures,
                results=None)
    if result is not None:
        item["results"] = {
            "attempt": result.attempt_id,
            "exit_code": result.outcome.get("exit_code"),
            "signal": result.outcome.get("signal"),
            **({"duration_s": result.outcome["duration_s"]}
               if isinstance(result.outcome.get("duration_s"), (int, float)) else {}),
            "stdout": result.stdout, "stderr": result.stderr, "outputs": result.outputs}
    return item


def attempt_item(attempt: AttemptRecord) -> dict[str, Any]:
    """jobs.show.reply.json#/definitions/attempt"""
    return {"id": attempt.id, "worker": attempt.worker_id, "kind": attempt.kind.value,
            "assigned_at": attempt.assigned_at, "started_at": attempt.started_at,
            "ended_at": attempt.ended_at, "exit_code": attempt.exit_code,
            "error": attempt.error}


class JobRequests:
    """The handlers (see the module docstring)."""

    def __init__(self, bus: Bus, store: Store, guard: RequestGuard, scheduler: JobScheduler,
                 *, max_payload: int, data_sink: DataSink | None = None) -> None:
        self.bus = bus
        self.store = store
        self.guard = guard
        self.scheduler = scheduler
        self.max_payload = max_payload
        self.data_sink = data_sink  # stores the small results a report carries

    def register(self) -> None:
        table: dict[str, Callable[[Incoming], Body]] = {
            "jobs.submit": self.jobs_submit,
            "jobs.list": self.jobs_list,
            "jobs.show": self.jobs_show,
            "jobs.cancel": self.jobs_cancel,
            "jobs.hold": self.jobs_hold,
            "jobs.release": self.jobs_release,
            "jobs.why": self.jobs_why,
            "jobs.summary": self.jobs_summary,
            "attempt.started": self.attempt_started,
            "attempt.report": self.attempt_report,
        }
        for mtype, fn in table.items():
            self.bus.on_inbox(mtype, guarded(self.bus, fn), lane=Lane.JOBS)

    def _is_admin(self, principal: str) -> bool:
        return self.guard.role_of(principal) is Role.ADMIN

    # -- owners -----------------------------------------------------------------------------

    def jobs_submit(self, incoming: Incoming) -> Body:
        req: JobsSubmit = incoming.body
        owner = incoming.sender
        assert owner is not None
        req = JobsSubmit(jobs=[job_deps.link_inputs(s) for s in req.jobs])  # futures: after
        admin = self._is_admin(owner)  # apps: pinned and checked (coordinator/job_apps.py)
        req = JobsSubmit(jobs=[job_apps.pin(self.store, owner, s, admin=admin, index=i)
                               for i, s in enumerate(req.jobs)])
        self._check_data(owner, req.jobs)
        for index, spec in enumerate(req.jobs):
            names = [i["name"] for i in spec.get("inputs") or ()]
            if len(names) != len(set(names)):
                raise Refusal("invalid", f"job {index}: two inputs have the same name")
            problem = replica_problem(spec)  # replicas, quorum (coordinator/job_replicas.py)
            if problem:
                raise Refusal("invalid", f"job {index}: {problem}")
        try:
            batch, ids = self.store.submit_jobs(owner, req.jobs, admin=self._is_admin(owner))
        except NotFound as e:  # a job in after: missing or someone else's
            raise Refusal("not_found", str(e)) from None
        log.info("batch %s: %s submitted %d job(s)", batch, owner, len(ids))
        self.scheduler.fair.note([owner])  # it has queued work (fair share's owners)
        self.scheduler.poke()
        warnings = submit_warnings(self.store, ids, req.jobs)
        return JobsSubmitted(batch=batch, ids=ids, warnings=warnings or None)

    def _check_data(self, owner: str, specs: list[dict[str, Any]]) -> None:
        """Every stdin and input must be a data object the owner may read."""
        hashes: set[str] = set()
        for spec in specs:
            if spec.get("stdin"):
                hashes.add(str(spec["stdin"]))
            hashes.update(str(i.get("sha256")) for i in spec.get("inputs") or ()
                          if "job" not in i)  # a future's data is checked when it runs
        admin = self._is_admin(owner)
        for sha in sorted(hashes):
            if not valid_sha256(sha):
                raise Refusal("invalid", f"{sha[:16]}… is not a SHA-256 (64 lowercase hex)")
            if not admin and self.store.readable_data_entry(sha, owner) is not None:
                continue
            if self.store.first_data_entry(sha) is None:
                raise Refusal("not_found", f"no data object {sha[:12]}…: upload it first "
                              "(`xcloud data put`)")
            if not admin:
                raise Refusal("forbidden", f"data {sha[:12]}… is not shared with {owner}")

    def jobs_list(self, incoming: Incoming) -> Body:
        req: JobsList = incoming.body
        sender = incoming.sender
        assert sender is not None
        admin = self._is_admin(sender)
        if req.owner is not None and req.owner != sender and not admin:
            raise Refusal("forbidden", f"{sender} may list its own jobs only")
        owner = req.owner if req.owner is not None else (None if admin else sender)
        limit = req.limit or DEFAULT_LIMIT
        jobs, more = self.store.list_jobs(owner=owner, state=req.state, batch=req.batch,
                                          after=req.after, limit=limit, spec=False)
        items = [job_summary(job) for job in jobs]
        # Each item counts its JSON and a separator. One dump of the whole list is that
        # sum plus one more byte per item (", "): when it fits, every item does.
        if items and REPLY_OVERHEAD + len(json.dumps(items)) - len(items) <= self.max_payload:
            return JobsListReply(jobs=items, more=more)
        kept: list[dict[str, Any]] = []
        size = REPLY_OVERHEAD
        for item in items:
            size += len(json.dumps(item)) + 1
            if size > self.max_payload:
                more = True
                break
            kept.append(item)
        return JobsListReply(jobs=kept, more=more)

    def _own_job(self, jid: str, sender: str) -> JobRecord:
        job = self.store.get_job(jid)
        if job is None or (job.owner != sender and not self._is_admin(sender)):
            raise Refusal("not_found", f"no job {jid}")
        return job

    def jobs_show(self, incoming: Incoming) -> Body:
        req: JobsShow = incoming.body
        sender = incoming.sender
        assert sender is not None
        job = self._own_job(req.job, sender)
        attempts, more = self.store.job_attempts(job.id, SHOW_ATTEMPTS)
        return JobsShowReply(job=job_detail(job, self.store.job_result(job.id)),
                             attempts=[attempt_item(a) for a in attempts],
                             more_attempts=more or None)

    def _change(self, incoming: Incoming, ids: list[str], target: JobState,
                reason: str = "") -> Body:
        sender = incoming.sender
        assert sender is not None
        changes, kills, counts = self.store.change_jobs(
            ids, target, requester=sender, admin=self._is_admin(sender), reason=reason)
        for aid, wid in kills:
            self.scheduler.kill(aid, wid, f"job {target.value} by {sender}")
        self.scheduler.announce(changes)
        if changes:
            self.scheduler.poke()
        return Ok(detail=counts)

    def jobs_cancel(self, incoming: Incoming) -> Body:
        req: JobsCancel = incoming.body
        return self._change(incoming, req.jobs, JobState.CANCELLED)

    def jobs_hold(self, incoming: Incoming) -> Body:
        req: JobsHold = incoming.body
        return self._change(incoming, req.jobs, JobState.HELD, req.reason or "")

    def jobs_release(self, incoming: Incoming) -> Body:
        req: JobsRelease = incoming.body
        return self._change(incoming, req.jobs, JobState.QUEUED, "released")

    def jobs_why(self, incoming: Incoming) -> Body:
        """Why the job is not running (coordinator/job_why.py): bounded, read-only."""
        req: JobsWhy = incoming.body
        sender = incoming.sender
        assert sender is not None
        job = self._own_job(req.job, sender)
        reply = explain(self.store, job)
        if job.state is JobState.QUEUED:  # its share of the slots (coordinator/fair_share.py)
            reply["fairness"] = self.scheduler.fair.describe(job.owner)[:256]
        return JobsWhyReply(**reply)

    def jobs_summary(self, incoming: Incoming) -> Body:
        """Per principal: jobs by state and share of the busy slots (fair_share.py). An
        admin sees every principal's line; a client its own, and the totals of all."""
        _req: JobsSummary = incoming.body
        sender = incoming.sender
        assert sender is not None
        rows, totals, more = summary_rows(
            self.store, self.scheduler.fair,
            principal=None if self._is_admin(sender) else sender)
        return JobsSummaryReply(lines=rows, totals=totals, more=more or None,
                                fair_share=self.scheduler.config.fair_share,
                                window_s=RECENT_S)

    # -- workers ----------------------------------------------------------------------------

    def _worker_attempt(self, aid: str, wid: str) -> AttemptRecord:
        attempt = self.store.get_attempt(aid)
        if attempt is None or attempt.worker_id != wid:
            log.warning("worker %s spoke of attempt %s, which is not its own", wid, aid)
            raise Refusal("not_found", f"no attempt {aid} on worker {wid}")
        return attempt

    def attempt_started(self, incoming: Incoming) -> Body:
        req: AttemptStarted = incoming.body
        wid = incoming.sender
        assert wid is not None
        attempt = self._worker_attempt(req.attempt, wid)
        current = self.store.acknowledge_attempt(attempt.id, started=True)
        return Ok(detail={"current": current or attempt.kind.live})

    def attempt_report(self, incoming: Incoming) -> Body:
        # one pooled connection for the report's store calls (record, announce, fill),
        # not a pool checkout each: this is the coordinator's hottest handler
        with self.store.held():
            return self._attempt_report(incoming)

    def _attempt_report(self, incoming: Incoming) -> Body:
        req: AttemptReport = incoming.body
        wid = incoming.sender
        assert wid is not None
        # (record_report checks the attempt is the sender's: NotFound, nothing written)
        try:
            kind = AttemptKind(req.kind)
        except ValueError:
            raise Refusal("invalid", f"unknown attempt kind {req.kind}") from None
        if kind not in REPORTABLE:
            raise Refusal("invalid", f"a worker cannot report {req.kind}")
        refs = [r for r in (req.stdout, req.stderr, *(req.outputs or ())) if r]
        if any(not valid_sha256(r.get("sha256")) for r in refs):
            raise Refusal("invalid", "a result's sha256 is not 64 lowercase hex digits")
        outcome = {name: getattr(req, name) for name in OUTCOME_FIELDS
                   if getattr(req, name) is not None}
        kept = keep_inline(self.data_sink, self.store, wid, req)  # coordinator/inline_results
        if kept.notes:
            outcome["error"] = "; ".join([*([outcome["error"]] if outcome.get("error")
                                            else []), *kept.notes])[:ERROR_MAX]
        try:
            result = self.store.record_report(
                req.attempt, wid, kind, outcome=outcome, stdout=kept.stdout,
                stderr=kept.stderr, outputs=kept.outputs,
                started_at=req.started_at, ended_at=req.ended_at)
        except NotFound:
            log.warning("worker %s spoke of attempt %s, which is not its own", wid,
                        req.attempt)
            raise Refusal("not_found", f"no attempt {req.attempt} on worker {wid}") from None
        self.scheduler.reported(req.attempt)  # (it acknowledged the assignment too)
        if result.changes:  # (at INFO unless it succeeded: a line per job is most of a log)
            log.log(logging.DEBUG if kind is AttemptKind.SUCCESS else logging.INFO,
                    "attempt %s on %s: %s -> job %s", req.attempt, wid, kind.value,
                    result.changes[0].state.value)
        self.scheduler.announce(result.changes)
        # The slot it freed is filled now and the assignments ride in the answer (a
        # worker of agent 0.3 or later); a pass still runs when the report changed more
        # than its own job's end (requeued, children released, a replica wanted).
        carried = self.scheduler.fill(wid) if result.recorded else None
        if result.recorded and (carried is None or any(
                not c.state.terminal or c.job != result.changes[0].job
                for c in result.changes)):
            self.scheduler.poke()
        if carried is None:
            return Ok(detail={"recorded": result.recorded, "counted": result.counted})
        return AttemptRecorded(recorded=result.recorded, counted=result.counted,
                               assign=carried or None)
