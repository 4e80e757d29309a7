"""Typed views of the batch-job messages (``jobs.*``, ``job.*``, ``attempt.*``; docs/jobs.md).

Registered in ``schemas.messages.REGISTRY`` like every other message type (schemas/messages.py
imports this module at its end). A job's spec (``JobSpec``) and the documents replies carry stay
plain dicts whose fields the schemas bound (schemas/json/jobs.submit.json#/definitions/job_spec,
jobs.list.reply.json#/definitions/job_summary, jobs.show.reply.json#/definitions/...).
Ids: job ``j-<16 hex>``, attempt ``a-<16 hex>`` (the fencing token), batch ``b-<16 hex>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from schemas.messages import Body, message
from schemas.outcome import Outcome

JOB_STATES = ("queued", "running", "held", "completed", "failed", "cancelled")
TERMINAL_JOB_STATES = frozenset({"completed", "failed", "cancelled"})
ATTEMPT_KINDS = ("assigned", "running", "success", "exit_nonzero", "worker_lost",
                 "lease_expired", "wall_clock", "oom", "input_failed", "cancelled", "stale",
                 "invalid")
REPORTED_KINDS = frozenset({"success", "exit_nonzero", "wall_clock", "oom", "input_failed",
                            "cancelled"})  # what a worker may say in attempt.report
SYSTEM_FAILURES = frozenset({"worker_lost", "lease_expired", "input_failed"})
JOB_FAILURES = frozenset({"exit_nonzero", "wall_clock", "oom"})
HOLD_CODES = ("user", "unmatchable", "input", "dependency", "admin", "no_quorum")
MAX_JOBS_PER_REQUEST = 500
# attempt.report.json#/properties/inline: small results ride in the report, not a transfer
INLINE_MAX_BYTES = 4096
INLINE_MAX_FILES = 8


# -- client -> coordinator -------------------------------------------------------------


@message
@dataclass(frozen=True, kw_only=True)
class JobsSubmit(Body):
    TYPE: ClassVar[str] = "jobs.submit"
    jobs: list[dict[str, Any]]  # JobSpec documents


@message
@dataclass(frozen=True, kw_only=True)
class JobsSubmitted(Body):
    TYPE: ClassVar[str] = "jobs.submitted"
    batch: str
    ids: list[str]
    warnings: list[dict[str, str]] | None = None  # jobs no known worker could run


@message
@dataclass(frozen=True, kw_only=True)
class JobsList(Body):
    TYPE: ClassVar[str] = "jobs.list"
    state: str | None = None
    batch: str | None = None
    owner: str | None = None
    limit: int | None = None
    after: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class JobsListReply(Body):
    TYPE: ClassVar[str] = "jobs.list.reply"
    jobs: list[dict[str, Any]]
    more: bool


@message
@dataclass(frozen=True, kw_only=True)
class JobsShow(Body):
    TYPE: ClassVar[str] = "jobs.show"
    job: str


@message
@dataclass(frozen=True, kw_only=True)
class JobsShowReply(Body):
    TYPE: ClassVar[str] = "jobs.show.reply"
    job: dict[str, Any]
    attempts: list[dict[str, Any]]
    more_attempts: bool | None = None


@message
@dataclass(frozen=True, kw_only=True)
class JobsCancel(Body):
    TYPE: ClassVar[str] = "jobs.cancel"
    jobs: list[str]


@message
@dataclass(frozen=True, kw_only=True)
class JobsHold(Body):
    TYPE: ClassVar[str] = "jobs.hold"
    jobs: list[str]
    reason: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class JobsRelease(Body):
    TYPE: ClassVar[str] = "jobs.release"
    jobs: list[str]


@message
@dataclass(frozen=True, kw_only=True)
class JobsWhy(Body):
    TYPE: ClassVar[str] = "jobs.why"
    job: str


@message
@dataclass(frozen=True, kw_only=True)
class JobsWhyReply(Body):
    """Why a job is not running (coordinator/job_why.py); the parts a queued job has are
    None otherwise."""

    TYPE: ClassVar[str] = "jobs.why.reply"
    job: str
    state: str
    verdict: str
    worker: str | None = None
    hold_code: str | None = None
    hold_reason: str | None = None
    workers: dict[str, int] | None = None
    requirements: list[dict[str, Any]] | None = None
    matching: dict[str, int] | None = None
    ahead: int | None = None
    ahead_more: bool | None = None
    fairness: str | None = None  # the owner's slots and weight against the others' (fair share)


@message
@dataclass(frozen=True, kw_only=True)
class JobsSummary(Body):
    """Each principal's jobs and share of the busy slots (coordinator/fair_share.py)."""

    TYPE: ClassVar[str] = "jobs.summary"


@message
@dataclass(frozen=True, kw_only=True)
class JobsSummaryReply(Body):
    """Per principal (an admin: all; a client: its own) and the totals of all."""

    TYPE: ClassVar[str] = "jobs.summary.reply"
    lines: list[dict[str, Any]]  # one per principal
    totals: dict[str, Any]
    fair_share: bool
    window_s: float
    more: bool | None = None


# -- coordinator -> owner --------------------------------------------------------------


@message
@dataclass(frozen=True, kw_only=True)
class JobEvent(Body):
    TYPE: ClassVar[str] = "job.event"
    job: str
    state: str
    at: float
    attempt: str | None = None
    worker: str | None = None
    exit_code: int | None = None
    reason: str | None = None

    @classmethod
    def of(cls, item: dict[str, Any]) -> JobEvent:
        """One event of a ``job.events`` (its schema bounds the same fields)."""
        return cls(job=item["job"], state=item["state"], at=item["at"],
                   attempt=item.get("attempt"), worker=item.get("worker"),
                   exit_code=item.get("exit_code"), reason=item.get("reason"))


MAX_EVENTS_PER_MESSAGE = 128  # job.events.json: events maxItems


@message
@dataclass(frozen=True, kw_only=True)
class JobEvents(Body):
    """Several job state changes in one message, for sessions that accept it
    (``client.accepts``) and the admins' feed: items are ``JobEvent`` fields."""

    TYPE: ClassVar[str] = "job.events"
    events: list[dict[str, Any]]

    def each(self) -> list[JobEvent]:
        return [JobEvent.of(item) for item in self.events]


# -- coordinator -> worker -------------------------------------------------------------


@message
@dataclass(frozen=True, kw_only=True)
class JobAssign(Body):
    TYPE: ClassVar[str] = "job.assign"
    attempt: str
    job: str
    owner: str
    spec: dict[str, Any]
    inputs: list[dict[str, Any]]  # [{name, sha256, size}]
    lease_s: float
    stdin: dict[str, Any] | None = None  # {sha256, size} when spec names stdin


@message
@dataclass(frozen=True, kw_only=True)
class JobKill(Body):
    TYPE: ClassVar[str] = "job.kill"
    attempt: str
    reason: str | None = None


# -- worker -> coordinator -------------------------------------------------------------


@message
@dataclass(frozen=True, kw_only=True)
class AttemptStarted(Body):
    TYPE: ClassVar[str] = "attempt.started"
    attempt: str


@message
@dataclass(frozen=True, kw_only=True)
class AttemptReport(Body, Outcome):
    """How an attempt ended; its exit facts come from ``Outcome``."""

    TYPE: ClassVar[str] = "attempt.report"
    attempt: str
    kind: str
    stdout: dict[str, Any] | None = None  # {sha256, size}
    stderr: dict[str, Any] | None = None
    outputs: list[dict[str, Any]] | None = None  # [{name, sha256, size}]
    inline: list[dict[str, Any]] | None = None  # [{sha256, data (base64)}]: small results
    started_at: float | None = None
    ended_at: float | None = None


@message
@dataclass(frozen=True, kw_only=True)
class AttemptRecorded(Body):
    """The answer to an ``attempt.report`` of a worker that takes its next attempts in it
    (``agent_version`` 0.3 or later): ``assign`` items are whole ``job.assign`` messages
    (envelope fields included: each is answered like one received alone)."""

    TYPE: ClassVar[str] = "attempt.recorded"
    recorded: bool
    counted: bool
    assign: list[dict[str, Any]] | None = None


ASSIGN_IN_ANSWER_MAX = 4  # job.assign messages in one attempt.recorded
ASSIGN_IN_ANSWER_BYTES = 32 * 1024  # ... and their wire size together
ASSIGN_IN_ANSWER_SINCE = (0, 3)  # the agent_version from which a worker takes them


# -- owner <-> worker: live output of a running attempt (docs/jobs.md, "Following") -------


@message
@dataclass(frozen=True, kw_only=True)
class JobFollow(Body):
    TYPE: ClassVar[str] = "job.follow"
    attempt: str
    follow: str  # the follower's id for this stream (its job.output carry it)
    stdout_offset: int | None = None
    stderr_offset: int | None = None
    stop: bool | None = None  # end this follow (the follower left): nothing more is sent


@message
@dataclass(frozen=True, kw_only=True)
class JobOutput(Body):
    TYPE: ClassVar[str] = "job.output"
    attempt: str
    follow: str
    seq: int
    stream: str
    offset: int
    data: str  # base64 of at most 64 KiB
    eof: bool | None = None
    kind: str | None = None
    exit_code: int | None = None
    reason: str | None = None
