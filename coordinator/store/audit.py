"""The exec audit trail: one record per remote command a worker reported (``exec.report``).

``ExecAuditRecord`` takes its exit fields from ``schemas.outcome.Outcome``, the one
declaration of how a command ended. Reports are written in batches
(``coordinator.audit.AuditWriter``); UNIQUE (reservation_id, exec_id) makes a redelivered
report a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.errors import InvalidArgument
from coordinator.models import ID_MAX, RID_MAX, STATE_MAX
from coordinator.store.engine import StoreBase, op
from coordinator.store.values import INT32, as_bool, as_float, as_int, checked_text, chunks, dicts
from schemas.outcome import ERROR_MAX, Outcome

AUDIT_INSERT_ROWS = 200  # rows per multi-row INSERT


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecAuditRecord(Outcome):
    """One command run under a reservation, as its worker reported it (plus its ids)."""

    id: int
    reservation_id: str
    worker_id: str
    client_id: str
    exec_id: str
    command: str
    mode: str | None
    started_at: float
    reported_at: float


def _audit_row(
    *,
    reservation_id: str,
    worker_id: str,
    client_id: str,
    exec_id: str,
    command: str,
    started_at: float,
    reported_at: float,
    mode: str | None = None,
    duration_s: float | None = None,
    exit_code: int | None = None,
    signal: int | None = None,
    timed_out: bool | None = None,
    truncated: bool | None = None,
    oom_killed: bool | None = None,
    output_bytes: int | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """An audit row, checked and clipped to the columns' limits."""
    checked_text(reservation_id, "reservation id", RID_MAX)
    checked_text(worker_id, "worker id", ID_MAX)
    checked_text(client_id, "client id", ID_MAX)
    checked_text(exec_id, "exec id", RID_MAX)
    if not isinstance(command, str):
        raise InvalidArgument("command must be a string")
    return {
        "reservation_id": reservation_id,
        "worker_id": worker_id,
        "client_id": client_id,
        "exec_id": exec_id,
        "command": command,
        "mode": mode[:STATE_MAX] if isinstance(mode, str) else None,
        "started_at": as_float(started_at) or 0.0,
        "duration_s": as_float(duration_s),
        "exit_code": as_int(exit_code, INT32),
        "signal": as_int(signal, INT32),
        "timed_out": timed_out if isinstance(timed_out, bool) else None,
        "truncated": truncated if isinstance(truncated, bool) else None,
        "oom_killed": oom_killed if isinstance(oom_killed, bool) else None,
        "output_bytes": as_int(output_bytes),
        "error": error[:ERROR_MAX] if isinstance(error, str) else None,
        "reported_at": reported_at,
    }


def _audit_record(row: dict[str, Any]) -> ExecAuditRecord:
    return ExecAuditRecord(
        id=int(row["id"]),
        reservation_id=row["reservation_id"],
        worker_id=row["worker_id"],
        client_id=row["client_id"],
        exec_id=row["exec_id"],
        command=row["command"],
        mode=row["mode"],
        started_at=row["started_at"],
        duration_s=row["duration_s"],
        exit_code=row["exit_code"],
        signal=row["signal"],
        timed_out=as_bool(row["timed_out"]),
        truncated=as_bool(row["truncated"]),
        oom_killed=as_bool(row["oom_killed"]),
        output_bytes=row["output_bytes"],
        error=row["error"],
        reported_at=row["reported_at"],
    )


class AuditStore(StoreBase):
    """Writing and reading the exec audit trail."""

    @op
    def record_exec_audits(self, rows: Sequence[dict[str, Any]]) -> int:
        """Store many audit records in one transaction (redelivered ones are skipped).

        Each row holds the keyword arguments of ``_audit_row``; returns how many rows
        were offered. The coordinator's audit writer batches reports through this.
        """
        clean = [_audit_row(**row) for row in rows]
        if not clean:
            return 0
        ExecAudit = self.models.ExecAudit
        with self.db.atomic():
            for chunk in chunks(clean, AUDIT_INSERT_ROWS):
                ExecAudit.insert_many(list(chunk)).on_conflict_ignore().execute()
        return len(clean)

    @op
    def list_exec_audit(
        self,
        *,
        client_id: str | None = None,
        worker_id: str | None = None,
        reservation_id: str | None = None,
        limit: int = 100,
    ) -> list[ExecAuditRecord]:
        """Audit records matching every given filter, newest first."""
        ExecAudit = self.models.ExecAudit
        query = ExecAudit.select().order_by(ExecAudit.id.desc()).limit(max(0, limit))
        if client_id is not None:
            query = query.where(ExecAudit.client_id == client_id)
        if worker_id is not None:
            query = query.where(ExecAudit.worker_id == worker_id)
        if reservation_id is not None:
            query = query.where(ExecAudit.reservation_id == reservation_id)
        return [_audit_record(row) for row in dicts(query)]
