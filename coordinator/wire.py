"""The wire format of the store's records: the dicts that replies carry.

Records (``coordinator.store``) are plain data; what a client sees of them is decided
here, in one place per reply type: ``workers.list.reply`` (``worker_summary`` +
``index``), ``workers.show.reply`` (``worker_detail``), ``reserve.reply`` /
``reservation.open`` / ``reservations.list.reply`` (``reservation``) and
``audit.list.reply`` (``audit_entry``). The JSON Schemas under schemas/json/ bound them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from coordinator.store import ExecAuditRecord, ReservationRecord, WorkerEventRecord, WorkerRecord
from coordinator.store.values import as_float

AUDIT_COMMAND_MAX = 1024  # characters of a command in audit.list (keeps replies small)


def worker_summary(record: WorkerRecord) -> dict[str, Any]:
    """A worker for listings (no full caps, no raw metrics)."""
    wire: dict[str, Any] = {
        "id": record.id,
        "name": record.name,
        "state": record.state.value,
        "tags": list(record.tags),
        "cpus": record.cpus,
        "memory_bytes": record.memory_bytes,
        "os": record.os,
        "arch": record.arch,
        "slots": record.slots,
        "free_slots": record.free_slots,
        "last_seen": record.last_seen,
        "description": record.description,
        "executors": list(record.executors),
    }
    for key in ("cpu_percent", "load1"):
        value = as_float(record.last_metrics.get(key))
        if value is not None:
            wire[key] = value
    return wire


def workers_list(records: Iterable[WorkerRecord]) -> list[dict[str, Any]]:
    """The rows of ``workers.list.reply``: summaries numbered in listing order."""
    return [{**worker_summary(record), "index": index} for index, record in enumerate(records)]


def worker_detail(record: WorkerRecord, events: Iterable[WorkerEventRecord]) -> dict[str, Any]:
    """The worker of ``workers.show.reply``: the summary, full caps, metrics and events."""
    wire = worker_summary(record)
    wire["caps"] = record.caps
    wire["last_metrics"] = record.last_metrics
    wire["events"] = [
        {
            "ts": event.ts,
            "old_state": event.old_state.value if event.old_state else None,
            "new_state": event.new_state.value,
            "reason": event.reason,
        }
        for event in events
    ]
    return wire


def reservation(record: ReservationRecord, worker_name: str | None = None) -> dict[str, Any]:
    """The reservation object of reserve.reply, reservation.open and listings."""
    wire: dict[str, Any] = {
        "id": record.id,
        "worker": record.worker_id,
        "client": record.client_id,
        "state": record.state.value,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "lease_s": record.lease_s,
        "image": record.image,
        "executor": record.executor,
    }
    if worker_name:
        wire["worker_name"] = worker_name
    if record.session:
        wire["session"] = record.session
    if record.ended_at is not None:
        wire["ended_at"] = record.ended_at
    if record.ended_reason:
        wire["ended_reason"] = record.ended_reason
    return wire


def audit_entry(record: ExecAuditRecord) -> dict[str, Any]:
    """A record of ``audit.list.reply``: the exec.report's field names, plus ids.

    A command longer than ``AUDIT_COMMAND_MAX`` is cut (``command_truncated``).
    """
    wire: dict[str, Any] = {
        "id": record.id,
        "reservation": record.reservation_id,
        "worker": record.worker_id,
        "client": record.client_id,
        "exec_id": record.exec_id,
        "command": record.command,
        "started_at": record.started_at,
        "reported_at": record.reported_at,
    }
    if record.mode is not None:
        wire["mode"] = record.mode
    wire.update(record.outcome_fields())
    if len(record.command) > AUDIT_COMMAND_MAX:
        wire["command"] = record.command[:AUDIT_COMMAND_MAX] + "…"
        wire["command_truncated"] = True
    return wire
