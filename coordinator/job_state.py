"""The job and attempt state machines, and what a failed attempt does to its job.

Explicit tables on the one helper (``coordinator.transitions``), as ``worker_state.py``
and ``reservation_state.py``: docs/state-machines.md draws them, the store moves rows only
``WHERE state IN sources_of(target)``, so of two racing movers (a report and a lost
worker, a cancel and a completion) exactly one wins, and every job ends in exactly one
terminal state (docs/jobs.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from coordinator.transitions import StateMachine


class JobState(StrEnum):
    """Where a job stands."""

    QUEUED = "queued"  # waiting for a worker
    RUNNING = "running"  # an attempt is assigned or running
    HELD = "held"  # kept out of the queue, with a reason, a code and a detail
    COMPLETED = "completed"  # its counted attempt succeeded
    FAILED = "failed"  # its retry budget is spent (or an exit code stopped retrying)
    CANCELLED = "cancelled"  # its owner or an admin cancelled it

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL: frozenset[JobState] = frozenset({JobState.COMPLETED, JobState.FAILED,
                                           JobState.CANCELLED})

JOB_MACHINE: StateMachine[JobState] = StateMachine("job", {
    # queued -> completed/failed: a replicated job is queued while it wants more replicas
    # placed, and its running replicas' reports may decide it then (coordinator/job_replicas.py)
    JobState.QUEUED: {JobState.RUNNING, JobState.HELD, JobState.CANCELLED,
                      JobState.COMPLETED, JobState.FAILED},
    # back to queued: a failure with budget left (system or the job's own)
    JobState.RUNNING: {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED,
                       JobState.HELD, JobState.QUEUED},
    JobState.HELD: {JobState.QUEUED, JobState.CANCELLED},
    JobState.COMPLETED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
})


class AttemptKind(StrEnum):
    """An attempt's state while it lives, and how it ended after."""

    ASSIGNED = "assigned"  # job.assign sent; waiting for the worker's ok
    RUNNING = "running"  # acknowledged (and maybe started) on its worker
    SUCCESS = "success"
    EXIT_NONZERO = "exit_nonzero"
    WORKER_LOST = "worker_lost"
    LEASE_EXPIRED = "lease_expired"  # not acknowledged in time, or no longer reported
    WALL_CLOCK = "wall_clock"
    OOM = "oom"
    INPUT_FAILED = "input_failed"
    CANCELLED = "cancelled"  # the job was cancelled or held while it ran
    STALE = "stale"  # (results only) a report for an attempt that was no longer current
    INVALID = "invalid"  # a replica's result that disagreed with its job's quorum

    @property
    def live(self) -> bool:
        return self in LIVE_ATTEMPTS


LIVE_ATTEMPTS: frozenset[AttemptKind] = frozenset({AttemptKind.ASSIGNED,
                                                    AttemptKind.RUNNING})
ENDINGS: frozenset[AttemptKind] = frozenset(  # stale: results only; invalid: a verdict
    set(AttemptKind) - LIVE_ATTEMPTS - {AttemptKind.STALE, AttemptKind.INVALID})
# A replica's comparable result (exit code and output hashes): the quorum may find it invalid.
RESULTS: frozenset[AttemptKind] = frozenset({AttemptKind.SUCCESS, AttemptKind.EXIT_NONZERO})
SYSTEM_FAILURES: frozenset[AttemptKind] = frozenset({
    AttemptKind.WORKER_LOST, AttemptKind.LEASE_EXPIRED, AttemptKind.INPUT_FAILED})
JOB_FAILURES: frozenset[AttemptKind] = frozenset({
    AttemptKind.EXIT_NONZERO, AttemptKind.WALL_CLOCK, AttemptKind.OOM})
REPORTABLE: frozenset[AttemptKind] = frozenset({
    AttemptKind.SUCCESS, AttemptKind.EXIT_NONZERO, AttemptKind.WALL_CLOCK, AttemptKind.OOM,
    AttemptKind.INPUT_FAILED, AttemptKind.CANCELLED})

ATTEMPT_MACHINE: StateMachine[AttemptKind] = StateMachine("attempt", {
    AttemptKind.ASSIGNED: {AttemptKind.RUNNING, *ENDINGS},
    AttemptKind.RUNNING: set(ENDINGS),
    **{kind: set() for kind in ENDINGS},
    **{kind: {AttemptKind.INVALID} for kind in RESULTS},  # outvoted by the quorum
    AttemptKind.INVALID: set(),
})


@dataclass(frozen=True)
class Verdict:
    """What an ended attempt does to its job: the job's next state and which budget
    (``system`` or ``job``) the failure spent, if any."""

    state: JobState
    spent: str | None = None
    reason: str = ""


def verdict(kind: AttemptKind, exit_code: int | None, *, system_failures: int,
            job_failures: int, max_system_retries: int, max_retries: int,
            stop_exit_codes: frozenset[int] = frozenset()) -> Verdict:
    """The job's fate after its current attempt ended with ``kind``.

    ``system_failures``/``job_failures`` count the failures before this one. A job that
    always fails therefore runs exactly ``1 + max_retries`` attempts (or ``1 +
    max_system_retries`` for system failures).
    """
    if kind is AttemptKind.SUCCESS:
        return Verdict(JobState.COMPLETED)
    if kind in SYSTEM_FAILURES or kind is AttemptKind.CANCELLED:
        # A live attempt the worker itself stopped (it was shutting down) is the
        # system's failure, not the job's: the coordinator's own cancels end the
        # attempt first, so their late reports are stale.
        if system_failures < max_system_retries:
            return Verdict(JobState.QUEUED, "system", f"{kind.value}: retrying")
        return Verdict(JobState.FAILED, "system",
                       f"{kind.value}: {max_system_retries} system retries spent")
    if kind in JOB_FAILURES:
        if kind is AttemptKind.EXIT_NONZERO and exit_code in stop_exit_codes:
            return Verdict(JobState.FAILED, "job", f"exit code {exit_code} stops retrying")
        if job_failures < max_retries:
            return Verdict(JobState.QUEUED, "job", f"{kind.value}: retrying")
        return Verdict(JobState.FAILED, "job", f"{kind.value}: {max_retries} retries spent")
    raise ValueError(f"{kind.value} does not end an attempt")
