"""``jobs.why``: why a job is not running (docs/jobs.md, "Why is my job not running?").

Like HTCondor's ``condor_q -better-analyze``: for a queued job, each requirement with the
number of online workers that meet it and that reject it (the scheduler's own predicates,
coordinator/job_matching.py), how many meet them all and of those how many have a free
slot now, are reserved or draining, the job's place in the queue (one bounded, indexed
count) and a one-line verdict. A job that is not queued says where it stands instead
(running on W, held with its reason, ended). Everything in the reply is bounded.
"""

from __future__ import annotations

import logging
from typing import Any

from coordinator import gpu_capacity, job_matching, job_replicas
from coordinator.job_state import JobState
from coordinator.scheduler import Capacity
from coordinator.store import Store, WorkerRecord
from coordinator.store.job_records import JobRecord
from coordinator.worker_state import LIVE_STATES, WorkerState

log = logging.getLogger(__name__)

AHEAD_MAX = 10_000  # jobs ahead counted at most (the count says "at least" past it)
REQUIREMENTS_MAX = 48  # requirement rows in a reply (a job has at most 32 tags + 10)
REASON_MAX = 256


def jobs_ahead(store: Store, job: JobRecord, limit: int = AHEAD_MAX) -> tuple[int, bool]:
    """Queued jobs before ``job`` in the scheduler's order (priority, then submission,
    then id): one walk of the queue index, at most ``limit`` rows; (count, more)."""
    count = store.jobs_ahead(job, limit)
    return min(count, limit), count > limit


def _not_queued(job: JobRecord) -> str:
    if job.state is JobState.RUNNING:
        return f"it is running on worker {job.worker or 'unknown'}"
    if job.state is JobState.HELD:
        text = f"it is held ({job.hold_code or 'user'}): {job.hold_reason or 'no reason given'}"
        return text + (f" ({job.hold_detail})" if job.hold_detail else "")
    return f"it has ended: {job.state.value}" + (
        f" (exit code {job.exit_code})" if job.exit_code is not None else "")


def _online(nobody: str) -> str:
    return nobody.replace("no worker", "no online worker", 1)


def explain(store: Store, job: JobRecord) -> dict[str, Any]:
    """The ``jobs.why.reply`` fields for ``job`` (see the module docstring)."""
    reply: dict[str, Any] = {"job": job.id, "state": job.state.value}
    if job.state is not JobState.QUEUED:
        reply["verdict"] = _not_queued(job)[:REASON_MAX]
        if job.worker:
            reply["worker"] = job.worker
        if job.state is JobState.HELD:
            reply["hold_code"] = job.hold_code
            reply["hold_reason"] = (job.hold_reason or "")[:REASON_MAX] or None
        return reply
    known = store.list_workers()
    online = [w for w in known if w.state in LIVE_STATES]
    rows = []
    for requirement in job_matching.requirements_of(job.spec)[:REQUIREMENTS_MAX]:
        rejecting = [w for w in online if requirement.check(w) is not None]
        row: dict[str, Any] = {"name": requirement.name, "wanted": requirement.wanted[:255],
                               "match": len(online) - len(rejecting),
                               "reject": len(rejecting)}
        if rejecting:
            row["example"] = (f"{rejecting[0].id}: "
                              f"{requirement.check(rejecting[0])}")[:REASON_MAX]
        rows.append((requirement, row))
    matching = [w for w in online if job_matching.never_fits(w, job.spec) is None]
    blocked = ""
    replicas = _replica_wait(store, job, matching)
    if replicas is not None:  # only workers that may take its next replica count
        matching, blocked = replicas
    counts = _slot_counts(store, job, matching)
    ahead, more = jobs_ahead(store, job)
    verdict = blocked or _verdict(len(known), online, rows, counts, ahead, more)
    if job.waiting:  # after: not schedulable before its parents completed
        verdict = f"waiting for {job.waiting} parent job(s) to complete (after)"
    reply.update(
        workers={"known": len(known), "online": len(online)},
        requirements=[row for _, row in rows],
        matching=counts, ahead=ahead, ahead_more=more or None,
        verdict=verdict[:REASON_MAX])
    return reply


def _replica_wait(store: Store, job: JobRecord, matching: list[WorkerRecord]
                  ) -> tuple[list[WorkerRecord], str] | None:
    """For a replicated job: the matching workers that may take its next replica (never
    one holding or having run one, nor an untrusted one: coordinator/job_replicas.py)
    and, when none may, the verdict that says so. None for an unreplicated job."""
    if not job_replicas.is_replicated(job.replicas, job.quorum):
        return None
    view = store.replica_view(job.id)
    eligible = [w for w in matching if w.id not in view.workers and w.id not in view.untrusted]
    if eligible or not matching:
        return eligible, ""
    ran = sum(1 for w in matching if w.id in view.workers)
    untrusted = sum(1 for w in matching if w.id in view.untrusted and w.id not in view.workers)
    return eligible, (f"waiting for another worker: its replicas run on distinct workers, and "
                      f"of the {len(matching)} matching, {ran} hold or ran one of its replicas"
                      f"{f' and {untrusted} are untrusted' if untrusted else ''}; it wants "
                      f"{view.more} more")


def _slot_counts(store: Store, job: JobRecord, matching: list[WorkerRecord]
                 ) -> dict[str, int]:
    """Of the workers meeting every requirement: free now, full, reserved, draining
    (the scheduler's own capacity arithmetic, ``scheduler.Capacity``)."""
    counts = {"all": len(matching), "free": 0, "busy": 0, "reserved": 0, "draining": 0}
    if not matching:
        return counts
    reserved = store.reserved_worker_ids()
    usage = store.attempt_usage()
    gpus_held = (store.attempt_gpu_usage() if gpu_capacity.job_ask(job.spec).count else {})
    for worker in matching:
        if worker.state is WorkerState.DRAINING:
            counts["draining"] += 1
        elif worker.id in reserved:
            counts["reserved"] += 1
        else:
            cap = Capacity(worker, usage.get(worker.id, (0, 0, 0)), gpus_held.get(worker.id, 0))
            fits = cap.slots_for(job) <= cap.free and cap.fits_gpus(job)
            counts["free" if fits else "busy"] += 1
    return counts


def _verdict(known: int, online: list[WorkerRecord], rows: list[tuple[Any, dict[str, Any]]],
             counts: dict[str, int], ahead: int, more: bool) -> str:
    ahead_text = f"{ahead}{'+' if more else ''} job(s) ahead"
    if not online:
        return f"no worker is online ({known} known)"
    if not counts["all"]:
        for requirement, row in rows:
            if not row["match"]:
                return _online(requirement.nobody)
        return "no online worker meets all of its requirements at once"
    usable = counts["all"] - counts["reserved"] - counts["draining"]
    if usable <= 0:
        return (f"every matching worker is reserved or draining "
                f"({counts['reserved']} reserved, {counts['draining']} draining)")
    if counts["free"]:
        return (f"{counts['free']} matching worker(s) have a free slot: it should start "
                f"at the next scheduler pass ({ahead_text})")
    return f"waiting for a free slot on {usable} matching worker(s): {ahead_text}"
