"""What the dashboard's job routes return (``/api/jobs``, ``/api/jobs/ID``).

Pure functions but one: ``output_preview`` reads the first ``PREVIEW_BYTES`` of a result
object from the coordinator's data store (``<data_dir>/objects/ab/cd/<sha256>``). The
audience rule is the reservations': a client sees its own jobs, an admin everybody's; a
job of somebody else is "not found" for a client, as over the bus.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from coordinator.job_state import JobState
from coordinator.store.job_records import AttemptRecord, JobRecord, ResultRecord

log = logging.getLogger(__name__)

PREVIEW_BYTES = 64 * 1024
COMMAND_SHOWN = 300  # characters of the command in the table
STATES = frozenset(s.value for s in JobState)

ObjectPath = Callable[[str], Path]


def command_of(spec: dict[str, Any]) -> str:
    command = spec.get("command")
    if isinstance(command, list):
        command = " ".join(str(part) for part in command)
    return command if isinstance(command, str) else ""


def job_row(job: JobRecord, worker_names: dict[str, str]) -> dict[str, Any]:
    """One job for the Jobs table."""
    command = command_of(job.spec)
    return {
        "id": job.id, "batch": job.batch, "name": job.name, "owner": job.owner,
        "state": job.state.value, "priority": job.priority, "submitted_at": job.submitted_at,
        "started_at": job.started_at, "ended_at": job.ended_at, "attempts": job.attempts,
        "worker": job.worker, "worker_name": worker_names.get(job.worker or ""),
        "exit_code": job.exit_code, "cpus": job.cpus, "memory_bytes": job.memory_bytes,
        "command": command[:COMMAND_SHOWN], "hold_reason": job.hold_reason,
    }


def attempt_entry(attempt: AttemptRecord, worker_names: dict[str, str]) -> dict[str, Any]:
    """One attempt and its timeline (assigned, acknowledged, started, ended)."""
    return {
        "id": attempt.id, "worker": attempt.worker_id,
        "worker_name": worker_names.get(attempt.worker_id), "kind": attempt.kind.value,
        "live": attempt.kind.live, "assigned_at": attempt.assigned_at,
        "acked_at": attempt.acked_at, "started_at": attempt.started_at,
        "ended_at": attempt.ended_at, "exit_code": attempt.exit_code, "error": attempt.error,
    }


def output_preview(ref: dict[str, Any] | None, object_path: ObjectPath | None
                   ) -> dict[str, Any] | None:
    """The first ``PREVIEW_BYTES`` of a stdout/stderr object as text (UTF-8, invalid bytes
    replaced); ``missing`` when the store no longer holds the file."""
    if not isinstance(ref, dict) or not isinstance(ref.get("sha256"), str):
        return None
    size = ref.get("size")
    preview: dict[str, Any] = {"sha256": ref["sha256"], "size": size, "text": "",
                               "shown": 0, "truncated": False, "missing": False}
    if object_path is None:
        preview["missing"] = True
        return preview
    try:
        with object_path(ref["sha256"]).open("rb") as handle:
            data = handle.read(PREVIEW_BYTES + 1)
    except (OSError, ValueError):
        preview["missing"] = True
        return preview
    shown = data[:PREVIEW_BYTES]
    preview.update(text=shown.decode("utf-8", errors="replace"), shown=len(shown),
                   truncated=len(data) > PREVIEW_BYTES)
    return preview


def result_entry(result: ResultRecord | None, object_path: ObjectPath | None
                 ) -> dict[str, Any] | None:
    """The counted result: how it ended, its output refs and previews."""
    if result is None:
        return None
    outcome = result.outcome
    return {
        "attempt": result.attempt_id, "kind": result.kind,
        "exit_code": outcome.get("exit_code"), "signal": outcome.get("signal"),
        "duration_s": outcome.get("duration_s"), "error": outcome.get("error"),
        "timed_out": outcome.get("timed_out"), "oom_killed": outcome.get("oom_killed"),
        "stdout": result.stdout, "stderr": result.stderr, "outputs": result.outputs,
        "stdout_preview": output_preview(result.stdout, object_path),
        "stderr_preview": output_preview(result.stderr, object_path),
    }


def job_detail(job: JobRecord, attempts: Iterable[AttemptRecord], older_attempts: bool,
               result: ResultRecord | None, worker_names: dict[str, str],
               object_path: ObjectPath | None) -> dict[str, Any]:
    """A job's page: the row, its spec, its attempts, its result once it ended."""
    detail = job_row(job, worker_names)
    detail.update(
        command=command_of(job.spec), spec=job.spec, hold_code=job.hold_code,
        hold_detail=job.hold_detail, system_failures=job.system_failures,
        job_failures=job.job_failures, max_retries=job.max_retries,
        max_system_retries=job.max_system_retries, current_attempt=job.current_attempt,
        attempts_list=[attempt_entry(a, worker_names) for a in attempts],
        older_attempts=older_attempts,
        result=result_entry(result, object_path) if job.state.terminal else None)
    return detail


def parse_states(text: str | None) -> list[str] | None:
    """``state=a,b`` → the states; ValueError for an unknown one."""
    if not text:
        return None
    states = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in states if s not in STATES]
    if unknown:
        raise ValueError(f"unknown job state {unknown[0][:32]!r} (one of "
                         f"{', '.join(sorted(STATES))})")
    return states or None
