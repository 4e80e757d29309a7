"""Prefetch: a full worker holds its next job before a slot frees, and gives it back to an
idle worker if it waits too long.

Without it every slot idles for a round trip after each job: the report travels to the
coordinator, is committed, and the next ``job.assign`` travels back (in the report's
answer for agents 0.3 and later: docs/jobs.md, "Prefetch").
Celery (prefetch multiplier) and Dask (tasks queued on workers) do the same; both are
known for jobs stuck behind a long one while another worker idles, which is what the
second half answers (Dask's work stealing, in its simplest form):

- ``prefetch_pass``: after the pass filled every free slot, jobs still queued go to
  online workers that hold fewer than ``slots + [jobs] prefetch`` attempts, one slot's
  worth each (no GPU jobs, no job that needs more than one slot). The worker accepts up
  to ``[worker] job_queue`` beyond its slots (it says how many in its caps: no worker is
  given more) and starts them in order as slots free.
- ``steal_pass``: when a pass leaves a slot free (nothing queued that it could run), an
  attempt that has waited on another worker for ``[jobs] steal_after_s`` without
  starting (acknowledged, no ``attempt.started``) and that this worker can run is taken
  back: it ends ``lease_expired`` without spending a retry (as a ``busy`` refusal does),
  its worker gets ``job.kill`` (it never starts it), and the next pass places the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coordinator import gpu_capacity
from coordinator.job_state import AttemptKind

if TYPE_CHECKING:
    from coordinator.scheduler import Capacity, JobScheduler

log = logging.getLogger(__name__)


@dataclass
class _Room:
    cap: Capacity
    left: int  # attempts it may still be given ahead of a free slot


def worker_queue(cap: Capacity, default: int) -> int:
    """How many attempts the worker takes beyond its slots (its caps' ``job_queue``,
    ``[worker] job_queue``). More would be refused ``busy``, and a ``busy`` worker is
    offered nothing until its next heartbeat: a prefetch above a worker's queue once cut
    throughput 50-fold (2 jobs/s). A worker that does not say gets ``default``."""
    value = cap.worker.caps.get("job_queue")
    if isinstance(value, int) and not isinstance(value, bool):
        return max(0, value)
    return default


def prefetch_pass(sched: JobScheduler, caps: list[Capacity]) -> int:
    """Give full workers their next job ahead of time; returns how many were assigned.

    ``caps``: every worker of this pass that takes jobs, as the pass left them (a full
    worker's ``free`` is zero or below: it holds that many attempts beyond its slots).
    """
    from coordinator.scheduler import requirement_mismatch

    extra = max(0, int(sched.config.prefetch))
    rooms = [_Room(cap, min(queue, cap.free + queue))
             for cap in caps for queue in (min(extra, worker_queue(cap, extra)),)]
    rooms = [r for r in rooms if r.left > 0]
    total = sum(r.left for r in rooms)
    if not total:
        return 0
    assigned = 0
    for job in sched.store.queued_jobs(total * max(1, sched.config.candidates_per_slot)):
        if total <= 0:
            break
        if gpu_capacity.job_ask(job.spec).count:
            continue  # a GPU job waits for a real slot (its devices are picked at start)
        best: _Room | None = None
        for room in rooms:
            if room.left <= 0 or room.cap.slots_for(job) != 1:
                continue
            if requirement_mismatch(room.cap.worker, job.spec) is not None:
                continue
            if best is None or room.left > best.left:
                best = room
        if best is not None and sched.assign(job, best.cap):
            best.left -= 1
            total -= 1
            assigned += 1
    return assigned


def steal_pass(sched: JobScheduler, idle: list[Capacity]) -> int:
    """Take back attempts waiting on busy workers for the ``idle`` ones (free slots the
    pass could not fill); returns how many were taken back."""
    from coordinator.scheduler import requirement_mismatch

    if not idle or sched.config.prefetch <= 0:
        return 0
    now = sched.now()
    waiting = sched.store.waiting_before(now - sched.config.steal_after_s)
    if not waiting:
        return 0
    idle_ids = {cap.worker.id for cap in idle}
    moved = 0
    for attempt in waiting:  # the newest first: the last in their worker's line
        if attempt.worker_id in idle_ids:
            continue  # it waits where a slot is free: it starts there next
        job = sched.store.get_job(attempt.job_id)
        if job is None:
            continue
        target = next((cap for cap in idle if cap.free > 0 and cap.slots_for(job) == 1
                       and requirement_mismatch(cap.worker, job.spec) is None), None)
        if target is None:
            continue
        reason = (f"waited {now - attempt.assigned_at:.1f}s for a slot on "
                  f"{attempt.worker_id}; moved to idle worker {target.worker.id}")
        changes = sched.store.end_attempt(attempt.id, AttemptKind.LEASE_EXPIRED, now=now,
                                          spend=False, error=reason)
        if not changes:
            continue  # it ended meanwhile (reported, cancelled)
        log.info("attempt %s of job %s: %s", attempt.id, attempt.job_id, reason)
        sched.announce(changes)
        sched.kill(attempt.id, attempt.worker_id, reason)
        target.free -= 1
        moved += 1
    if moved:
        sched.poke()
    return moved
