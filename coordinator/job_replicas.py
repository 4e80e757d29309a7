"""Replicated jobs with a quorum, and worker trust (docs/jobs.md, "Replicas and quorum").

Volunteer machines lie or break, so (as BOINC's ``target_nresults`` / ``min_quorum`` /
``max_total_results``) a job may ask ``replicas`` N attempts on distinct workers and
complete only when ``quorum`` K of their results agree: same exit code, same SHA-256 of
stdout and of each collected output, by name (stderr is not compared: it carries timings
and host noise). The first result of the agreeing group is the canonical one; results
that differ from it are marked ``invalid``. While no K agree, more attempts are issued,
at most ``max_replica_attempts`` in all (default N + 2K, at most 64); then the job fails
with "no quorum".

Trust: each worker's valid and invalid results are counted (``xc_worker_trust``); a
worker with ``UNTRUSTED_AFTER`` (2) invalid results is untrusted: it is offered no
replicated job, and a result of it that was in flight never counts toward a quorum.

This module is the pure part (signatures, the tally, what a job wants next, placement
among the scheduler's capacities); ``coordinator.store.job_replicas`` runs it inside the
store's transactions. A job with replicas 1 and quorum 1 never comes here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coordinator.job_state import JobState

if TYPE_CHECKING:
    from coordinator.scheduler import Capacity, JobScheduler
    from coordinator.store.job_records import JobRecord

MAX_REPLICAS = 16
MAX_ATTEMPTS_CAP = 64
UNTRUSTED_AFTER = 2  # invalid results that make a worker untrusted

Signature = tuple[int | None, str | None, tuple[tuple[str, str], ...]]


def is_replicated(replicas: int, quorum: int) -> bool:
    return replicas > 1 or quorum > 1


def max_attempts(spec: dict[str, Any], replicas: int, quorum: int) -> int:
    """The bound on a replicated job's attempts (BOINC's max_total_results)."""
    asked = spec.get("max_replica_attempts")
    if isinstance(asked, int) and asked > 0:
        return max(asked, replicas)
    return min(MAX_ATTEMPTS_CAP, replicas + 2 * quorum)


def check_spec(spec: dict[str, Any]) -> str | None:
    """Why the spec's replica fields are inconsistent (the schema bounds each), or None."""
    replicas = int(spec.get("replicas") or 1)
    quorum = int(spec.get("quorum") or 1)
    if not 1 <= replicas <= MAX_REPLICAS:
        return f"replicas is 1 to {MAX_REPLICAS}"
    if not 1 <= quorum <= replicas:
        return f"quorum is 1 to replicas ({replicas})"
    if spec.get("adaptive_after") is not None and replicas == 1:
        return "adaptive_after needs replicas > 1"
    bound = spec.get("max_replica_attempts")
    if bound is not None and not replicas <= int(bound) <= MAX_ATTEMPTS_CAP:
        return f"max_replica_attempts is replicas ({replicas}) to {MAX_ATTEMPTS_CAP}"
    return None


def signature(outcome: dict[str, Any], stdout: dict[str, Any] | None,
              outputs: Iterable[dict[str, Any]]) -> Signature:
    """What replicas must agree on: exit code, stdout's hash, each output's hash by name."""
    code = outcome.get("exit_code")
    return (int(code) if isinstance(code, int) else None,
            stdout.get("sha256") if isinstance(stdout, dict) else None,
            tuple(sorted((str(o.get("name")), str(o.get("sha256"))) for o in outputs
                         if isinstance(o, dict))))


@dataclass(frozen=True, slots=True)
class Vote:
    """One replica's comparable result."""

    attempt: str
    worker: str
    signature: Signature
    trusted: bool


@dataclass(frozen=True, slots=True)
class Decision:
    """What a replicated job does now: its state, how many more attempts it wants
    placed, and (when decided by a quorum) the canonical vote."""

    state: JobState
    more: int = 0
    canonical: Vote | None = None
    reason: str = ""


def decide(*, replicas: int, quorum: int, issued: int, bound: int, live: int,
           votes: Sequence[Vote]) -> Decision:
    """The job's fate from its live attempts and its replicas' results (oldest first).

    ``issued``: attempts counted toward ``bound`` so far, live ones included. The job
    wants ``max(N - results, K - largest group)`` attempts in flight."""
    groups: dict[Signature, list[Vote]] = {}
    for vote in votes:
        if vote.trusted:
            groups.setdefault(vote.signature, []).append(vote)
    best = max(groups.values(), key=len, default=[])
    if len(best) >= quorum:
        code = best[0].signature[0]
        state = JobState.COMPLETED if code == 0 else JobState.FAILED
        return Decision(state, canonical=best[0],
                        reason=f"{len(best)} of {len(votes)} results agree (quorum {quorum})")
    results = sum(len(g) for g in groups.values())
    left = max(0, bound - issued)
    if len(best) + live + left < quorum:
        return Decision(JobState.FAILED, reason=(
            f"no quorum: {results} result(s), at most {len(best)} agree, {quorum} needed; "
            f"{issued} of {bound} attempts spent"))
    more = min(max(replicas - results, quorum - len(best)) - live, left)
    if more > 0:
        return Decision(JobState.QUEUED, more=more,
                        reason=f"{len(best)} of {quorum} agreeing results: more replicas")
    return Decision(JobState.RUNNING, reason=f"{live} replica(s) running")


# -- placement (called from the scheduler's _place) ------------------------------------


def _host(cap: Capacity) -> str:
    host = cap.worker.caps.get("host") if isinstance(cap.worker.caps, dict) else None
    name = host.get("hostname") if isinstance(host, dict) else None
    return str(name) if name else cap.worker.id


def place_replica(sched: JobScheduler, job: JobRecord, free: list[Capacity]
                  ) -> Capacity | None:
    """Where the next replica of ``job`` goes, or None (it wants none now, or no worker
    fits). Never a worker with a live attempt or a result of the job, nor an untrusted
    one; a worker on a host the job has not used yet first (the nearest thing to a
    distinct owner here: workers are principals of their own). The store checks the
    first two again when it commits the attempt."""
    view = sched.store.replica_view(job.id)
    if view.more <= 0:
        return None
    fits = [c for c in free if c.worker.id not in view.workers
            and c.worker.id not in view.untrusted]
    hosts = {_host(c) for c in sched.pass_caps() if c.worker.id in view.workers}
    fresh = [c for c in fits if _host(c) not in hosts]
    alone = [c for c in fits if c.worker.id in view.veterans]  # adaptive: runs it alone
    for group in (alone, fresh, fits):
        target = type(sched)._place(job, group, plain=True) if group else None
        if target is not None:
            return target
    return None
