"""The wire format of the store's records: the dicts that replies carry.

Records (``coordinator.store``) are plain data; what a client sees of them is decided
here, in one place per reply type: ``workers.list.reply`` (``worker_summary`` +
``index``), ``workers.show.reply`` (``worker_detail``), ``reserve.reply`` /
``reservation.open`` / ``reservations.list.reply`` (``reservation``) and
``audit.list.reply`` (``audit_entry``). The JSON Schemas under schemas/json/ bound them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

import fastjsonschema

from coordinator.store import ExecAuditRecord, ReservationRecord, WorkerEventRecord, WorkerRecord
from coordinator.store.values import as_float
from schemas.registry import definition_validator

log = logging.getLogger(__name__)

AUDIT_COMMAND_MAX = 1024  # characters of a command in audit.list (keeps replies small)
EVENT_REASON_MAX = 1024  # characters of an event's reason in workers.show
# Bounds of worker_summary (envelope.json); stored values are cut to them, so a row written
# before the bounds existed still makes a valid reply.
TAGS_MAX = 64
DESCRIPTION_MAX = 4096
EXECUTORS_MAX = 8


def worker_summary(record: WorkerRecord) -> dict[str, Any]:
    """A worker for listings (no full caps, no raw metrics)."""
    wire: dict[str, Any] = {
        "id": record.id,
        "name": record.name,
        "state": record.state.value,
        "tags": list(record.tags[:TAGS_MAX]),
        "cpus": record.cpus,
        "memory_bytes": record.memory_bytes,
        "os": record.os,
        "arch": record.arch,
        "slots": record.slots,
        "free_slots": record.free_slots,
        "last_seen": record.last_seen,
        "description": record.description[:DESCRIPTION_MAX],
        "executors": list(record.executors[:EXECUTORS_MAX]),
    }
    for key in ("cpu_percent", "load1"):
        value = as_float(record.last_metrics.get(key))
        if value is not None:
            wire[key] = value
    return wire


def workers_list(records: Iterable[WorkerRecord], budget: int) -> tuple[list[dict[str, Any]], bool]:
    """The rows of ``workers.list.reply``: summaries numbered in listing order, as many as
    fit in ``budget`` bytes of JSON; the flag says whether some were left out."""
    rows: list[dict[str, Any]] = []
    used = 0
    for index, record in enumerate(records):
        row = {**worker_summary(record), "index": index}
        used += len(json.dumps(row, separators=(",", ":"))) + 1
        if used > budget:
            return rows, True
        rows.append(row)
    return rows, False


def worker_detail(record: WorkerRecord, events: Iterable[WorkerEventRecord]) -> dict[str, Any]:
    """The worker of ``workers.show.reply``: the summary, full caps, metrics and events.

    The caps and metrics go out only when they have the shape the schemas bound (the
    worker.caps and worker.heartbeat bodies): what arrives is validated at the edge, but
    a row written before those bounds existed must not make a reply the bus cannot carry.
    """
    wire = worker_summary(record)
    caps = _bounded(record.id, "caps", record.caps, "worker.caps", "caps")
    if caps is not None:
        wire["caps"] = caps
    metrics = _bounded(record.id, "last metrics", record.last_metrics, "worker.heartbeat",
                       "metrics")
    if metrics is not None:
        wire["last_metrics"] = metrics
    wire["events"] = [
        {
            "ts": event.ts,
            "old_state": event.old_state.value if event.old_state else None,
            "new_state": event.new_state.value,
            "reason": event.reason[:EVENT_REASON_MAX],
        }
        for event in events
    ]
    return wire


def _bounded(wid: str, what: str, document: dict[str, Any], schema: str,
             definition: str) -> dict[str, Any] | None:
    """``document`` when it conforms to ``{schema}.json#/definitions/{definition}``."""
    if not document:
        return None
    try:
        definition_validator(schema, definition)(document)
    except fastjsonschema.JsonSchemaException as err:
        log.warning("stored %s of worker %s left out of workers.show: %s", what, wid,
                    getattr(err, "message", err))
        return None
    return document


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
