"""The records of batch jobs (docs/jobs.md) and their conversion from rows.

Plain frozen data for the coordinator's handlers and the wire (``coordinator/
job_requests.py``), apart from ``coordinator.store.jobs``'s queries; the default budgets
and the columns a JobSpec fills live here too, beside the records they shape.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from coordinator.job_state import AttemptKind, JobState
from coordinator.store.values import loads

DEFAULT_SYSTEM_RETRIES = 3
DEFAULT_RETRIES = 0
ERROR_MAX = 4096
HOLD_REASON_MAX = 1024


def new_id(prefix: str) -> str:
    """``j-``, ``a-`` or ``b-`` followed by 16 random hex digits."""
    return f"{prefix}-{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    batch: str
    owner: str
    name: str
    state: JobState
    priority: int
    submitted_at: float
    spec: dict[str, Any]
    cpus: int
    memory_bytes: int
    max_system_retries: int
    max_retries: int
    system_failures: int
    job_failures: int
    attempts: int
    current_attempt: str | None
    worker: str | None
    exit_code: int | None
    started_at: float | None
    ended_at: float | None
    hold_reason: str | None
    hold_code: str | None
    hold_detail: str | None
    gpus: int = 0  # resources.gpus (docs/gpus.md)
    waiting: int = 0  # parents (after) not completed yet: queued but not schedulable
    replicas: int = 1  # attempts on distinct workers (coordinator/job_replicas.py)
    quorum: int = 1  # agreeing results that complete it


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    id: str
    job_id: str
    worker_id: str
    owner: str
    kind: AttemptKind
    assigned_at: float
    acked_at: float | None
    started_at: float | None
    ended_at: float | None
    exit_code: int | None
    error: str | None
    missing: int = 0


@dataclass(frozen=True, slots=True)
class ResultRecord:
    attempt_id: str
    job_id: str
    kind: str
    counted: bool
    outcome: dict[str, Any]
    stdout: dict[str, Any] | None
    stderr: dict[str, Any] | None
    outputs: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class JobChange:
    """One committed job state change, for the owner's ``job.event``."""

    job: str
    owner: str
    state: JobState
    at: float
    attempt: str | None = None
    worker: str | None = None
    exit_code: int | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ReportOutcome:
    """What an ``attempt.report`` did: ``recorded`` (new row), ``counted`` (it decided
    the job), and the job changes to announce."""

    recorded: bool
    counted: bool
    changes: tuple[JobChange, ...] = ()


def _job(row: dict[str, Any]) -> JobRecord:
    return JobRecord(
        id=row["id"], batch=row["batch"], owner=row["owner"], name=row["name"] or "",
        state=JobState(row["state"]), priority=-int(row["rank"]),
        submitted_at=row["submitted_at"], spec=loads(row.get("spec"), {}), cpus=row["cpus"],
        memory_bytes=row["memory_bytes"], max_system_retries=row["max_system_retries"],
        max_retries=row["max_retries"], system_failures=row["system_failures"],
        job_failures=row["job_failures"], attempts=row["attempts"],
        current_attempt=row["current_attempt"], worker=row["worker"],
        exit_code=row["exit_code"], started_at=row["started_at"], ended_at=row["ended_at"],
        hold_reason=row["hold_reason"], hold_code=row["hold_code"],
        hold_detail=row["hold_detail"], gpus=int(row.get("gpus") or 0),
        waiting=int(row.get("waiting") or 0), replicas=int(row.get("replicas") or 1),
        quorum=int(row.get("quorum") or 1))


def _attempt(row: dict[str, Any]) -> AttemptRecord:
    return AttemptRecord(
        id=row["id"], job_id=row["job_id"], worker_id=row["worker_id"], owner=row["owner"],
        kind=AttemptKind(row["kind"]), assigned_at=row["assigned_at"],
        acked_at=row["acked_at"], started_at=row["started_at"], ended_at=row["ended_at"],
        exit_code=row["exit_code"], error=row["error"], missing=row["missing"])


def _input_hashes(spec: dict[str, Any]) -> set[str]:
    hashes = {i["sha256"] for i in spec.get("inputs") or () if isinstance(i, dict)
              and isinstance(i.get("sha256"), str)}
    if isinstance(spec.get("stdin"), str):
        hashes.add(spec["stdin"])
    app = spec.get("app")  # an app job's binaries, archive (coordinator/job_apps.py)
    binaries = app.get("binaries") if isinstance(app, dict) else None
    if isinstance(binaries, dict):
        hashes.update(s for s in binaries.values() if isinstance(s, str))
    if isinstance(app, dict) and isinstance(app.get("sha256"), str):  # its docker archive
        hashes.add(app["sha256"])
    return hashes


def spec_columns(spec: dict[str, Any]) -> dict[str, Any]:
    """The columns a JobSpec fills (defaults of docs/jobs.md)."""
    resources = spec.get("resources") or {}
    name = spec.get("name")
    return {
        "name": name if isinstance(name, str) else "",
        "rank": -int(spec.get("priority") or 0),
        "cpus": int(resources.get("cpus") or 1),
        "memory_bytes": int(resources.get("memory_bytes") or 0),
        "gpus": int(resources.get("gpus") or 0),
        "max_system_retries": int(spec.get("max_system_retries", DEFAULT_SYSTEM_RETRIES)),
        "max_retries": int(spec.get("max_retries", DEFAULT_RETRIES)),
        "replicas": int(spec.get("replicas") or 1),
        "quorum": int(spec.get("quorum") or 1),
    }
