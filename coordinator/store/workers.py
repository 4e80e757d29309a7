"""Workers: capability documents, states and their audited transitions, listings.

A worker's row is its latest self-description (caps) plus what the coordinator decided
(state, reason); every state change is checked against ``coordinator.worker_state`` and
leaves a ``WorkerEventRecord``. Heartbeats update the same rows (``store.heartbeats``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from coordinator.errors import InvalidArgument, NotFound
from coordinator.models import ID_MAX, SHORT_MAX
from coordinator.store.engine import StoreBase, op
from coordinator.store.values import (
    IN_CHUNK,
    INT32,
    as_float,
    as_int,
    checked_text,
    chunks,
    dicts,
    dumps,
    loads,
    tuples,
)
from coordinator.worker_state import LIVE_STATES, WorkerState, check_transition

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL = 5.0  # until the worker's first heartbeat says otherwise
# A stored capability document is at most this much JSON. The worker.caps schema bounds
# every part (its largest valid document is about 0.6 MiB, tests/test_schemas.py); this
# catches documents that reach the store by another path, so none can make a
# workers.show reply over bus.max_payload.
CAPS_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A worker as stored, with JSON columns decoded."""

    id: str
    name: str
    state: WorkerState
    state_reason: str
    state_changed_at: float
    description: str
    tags: list[str]
    caps: dict[str, Any]
    cpus: int
    memory_bytes: int
    os: str
    arch: str
    executors: list[Any]
    slots: int
    free_slots: int
    heartbeat_interval: float
    first_seen: float
    last_seen: float
    last_heartbeat_at: float | None
    last_metrics: dict[str, Any]
    heartbeat_seq: int


@dataclass(frozen=True, slots=True)
class WorkerEventRecord:
    """One audited transition; ``old_state`` is None when the worker first joined."""

    id: int
    worker_id: str
    ts: float
    old_state: WorkerState | None
    new_state: WorkerState
    reason: str


def _caps_fields(wid: str, caps: dict[str, Any]) -> dict[str, Any]:
    """Worker columns from a capability document; optional parts may be absent."""
    if not isinstance(caps, dict):
        raise InvalidArgument(f"capabilities of {wid!r} must be an object")
    if caps.get("wid", wid) != wid:
        raise InvalidArgument(f"capabilities name worker {caps.get('wid')!r}, not {wid!r}")
    tags = caps.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidArgument(f"tags of {wid!r} must be a list of strings")
    executors = caps.get("executors") or []
    if not isinstance(executors, list):
        raise InvalidArgument(f"executors of {wid!r} must be a list")
    host: dict[str, Any] = caps["host"] if isinstance(caps.get("host"), dict) else {}
    cpu: dict[str, Any] = caps["cpu"] if isinstance(caps.get("cpu"), dict) else {}
    description = caps.get("description")
    slots = as_int(caps.get("slots"), INT32)
    interval = as_float(caps.get("heartbeat_s"))
    document = dumps(caps)
    if len(document) > CAPS_MAX_BYTES:
        raise InvalidArgument(f"capabilities of {wid!r} are {len(document)} bytes of JSON, "
                              f"over the limit of {CAPS_MAX_BYTES}")
    fields = {
        "name": checked_text(caps.get("name") or wid, "worker name", ID_MAX),
        "description": description if isinstance(description, str) else "",
        "tags": dumps(tags),
        "caps": document,
        "cpus": max(0, as_int(cpu.get("count"), INT32) or 0),
        "memory_bytes": max(0, as_int(caps.get("memory_bytes")) or 0),
        "os": str(host.get("os") or "")[:SHORT_MAX],
        "arch": str(host.get("arch") or "")[:SHORT_MAX],
        "executors": dumps(executors),
        "slots": 1 if slots is None else max(0, slots),
    }
    if interval is not None and interval > 0:  # announced period; heartbeats refine it
        fields["heartbeat_interval"] = interval
    return fields


def _worker_record(row: dict[str, Any], *, caps_decoded: bool = False) -> WorkerRecord:
    return WorkerRecord(
        id=row["id"],
        name=row["name"],
        state=WorkerState(row["state"]),
        state_reason=row["state_reason"],
        state_changed_at=row["state_changed_at"],
        description=row["description"],
        tags=loads(row["tags"], []),
        caps=row["caps"] if caps_decoded else loads(row["caps"], {}),
        cpus=row["cpus"],
        memory_bytes=row["memory_bytes"],
        os=row["os"],
        arch=row["arch"],
        executors=loads(row["executors"], []),
        slots=row["slots"],
        free_slots=row["free_slots"],
        heartbeat_interval=row["heartbeat_interval"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        last_heartbeat_at=row["last_heartbeat_at"],
        last_metrics=loads(row["last_metrics"], {}),
        heartbeat_seq=row["heartbeat_seq"],
    )


class WorkerStore(StoreBase):
    """Worker rows and their state transitions."""

    # ---- caps and state

    @op
    def upsert_worker_caps(
        self, wid: str, caps: dict[str, Any], now: float, *, keep_state: bool = False
    ) -> WorkerRecord:
        """Record a worker's capability document and bring it online.

        A new worker joins ONLINE; a LOST or OFFLINE one comes back ONLINE; a DRAINING one
        stays DRAINING (a drain is left only by an explicit status or admin action).
        ``keep_state`` (a *retained* caps document, which says what a worker is, not that
        it is up) updates the fields of a known worker without touching its state.
        """
        checked_text(wid, "worker id", ID_MAX)
        fields = _caps_fields(wid, caps)
        Worker = self.models.Worker
        with self.db.atomic():
            row = self._locked_worker(wid)
            if row is None:
                self._insert_worker(wid, fields, now)
            else:
                free = min(row["free_slots"], fields["slots"])
                Worker.update(**fields, free_slots=free, last_seen=now).where(
                    Worker.id == wid
                ).execute()
                if not keep_state and row["state"] != WorkerState.DRAINING.value:
                    self._transition(
                        wid, WorkerState(row["state"]), WorkerState.ONLINE, "capabilities", now
                    )
            fresh = dicts(Worker.select().where(Worker.id == wid))
        return _worker_record(fresh[0])

    def _insert_worker(self, wid: str, fields: dict[str, Any], now: float) -> None:
        self.models.Worker.insert(
            {"heartbeat_interval": DEFAULT_HEARTBEAT_INTERVAL, **fields},
            id=wid,
            state=WorkerState.ONLINE.value,
            state_reason="joined",
            state_changed_at=now,
            free_slots=fields["slots"],
            first_seen=now,
            last_seen=now,
        ).execute()
        self.models.WorkerEvent.insert(
            worker_id=wid,
            ts=now,
            old_state=None,
            new_state=WorkerState.ONLINE.value,
            reason="joined",
        ).execute()
        log.info("worker %s joined", wid)

    def _locked_worker(self, wid: str) -> dict[str, Any] | None:
        """``{id, state, free_slots}`` of ``wid``, row-locked until commit; None if unknown."""
        Worker = self.models.Worker
        query = Worker.select(Worker.id, Worker.state, Worker.free_slots).where(Worker.id == wid)
        rows = dicts(self._for_update(query))
        return rows[0] if rows else None

    def _transition(
        self, wid: str, old: WorkerState, new: WorkerState, reason: str, now: float
    ) -> tuple[WorkerState, WorkerState] | None:
        """Apply a checked transition and audit it; call inside a transaction."""
        if not check_transition(wid, old, new):
            return None
        Worker = self.models.Worker
        Worker.update(state=new.value, state_reason=reason, state_changed_at=now).where(
            Worker.id == wid
        ).execute()
        self.models.WorkerEvent.insert(
            worker_id=wid, ts=now, old_state=old.value, new_state=new.value, reason=reason
        ).execute()
        log.info("worker %s: %s -> %s (%s)", wid, old.value, new.value, reason)
        return old, new

    @op
    def set_worker_state(
        self, wid: str, new_state: WorkerState, reason: str, now: float, *, seen: bool = False
    ) -> tuple[WorkerState, WorkerState] | None:
        """Move a worker to ``new_state``; ``(old, new)``, or None when it was already there.

        ``seen=True`` when the change comes from a message of the worker itself (its status):
        ``last_seen`` moves to ``now`` so liveness deadlines restart from it.
        Raises NotFound for an unknown worker, InvalidTransition for a forbidden change.
        """
        new = WorkerState(new_state)
        Worker = self.models.Worker
        with self.db.atomic():
            row = self._locked_worker(wid)
            if row is None:
                raise NotFound(f"no worker {wid!r}")
            if seen:
                Worker.update(last_seen=now).where(Worker.id == wid).execute()
            return self._transition(wid, WorkerState(row["state"]), new, reason, now)

    # ---- queries

    @op
    def schedulable_workers(self, only: str | None = None) -> list[WorkerRecord]:
        """Online workers (``only`` that one, if online: a fill after one worker's report
        reads its row, not every worker's capabilities), as the job scheduler reads them
        in every pass: without their last metrics, and with each capability document
        decoded once per change (one may be 640 kB of JSON; a pass over 1,000 workers
        would otherwise decode them all every time)."""
        where, args = ("{state} = {?} AND {id} = {?}", (WorkerState.ONLINE.value, only)
                       ) if only else ("{state} = {?}", (WorkerState.ONLINE.value,))
        rows = self._sql.rows(
            "SELECT {id}, {name}, {state}, {state_reason}, {state_changed_at}, "
            "{description}, {tags}, {caps}, {cpus}, {memory_bytes}, {os}, {arch}, "
            "{executors}, {slots}, {free_slots}, {heartbeat_interval}, {first_seen}, "
            "{last_seen}, {last_heartbeat_at}, {heartbeat_seq} FROM {workers} "
            "WHERE " + where + " ORDER BY {first_seen}, {id}", *args)
        cache = self._caps_cache
        records = []
        for row in rows:
            raw = row["caps"] or "{}"
            known = cache.get(row["id"])
            if known is None or known[0] != raw:
                known = (raw, loads(raw, {}))
                cache[row["id"]] = known
            row["caps"] = known[1]
            row["last_metrics"] = "{}"
            records.append(_worker_record(row, caps_decoded=True))
        if only is None and len(cache) > 2 * len(rows) + 64:  # offline long ago: forget
            seen = {row["id"] for row in rows}
            for wid in [w for w in cache if w not in seen]:
                del cache[wid]
        return records

    @functools.cached_property
    def _caps_cache(self) -> dict[str, tuple[str, dict[str, Any]]]:
        return {}

    @op
    def list_workers(
        self,
        state: WorkerState | Iterable[WorkerState] | None = None,
        tags: Iterable[str] | None = None,
        min_cpus: int | None = None,
        min_memory_bytes: int | None = None,
        name: str | None = None,
    ) -> list[WorkerRecord]:
        """Workers matching every given filter, ordered by first_seen then id.

        The order is stable, so "worker N of the list" keeps meaning the same worker.
        ``tags``: the worker must carry all of them.
        """
        Worker = self.models.Worker
        query = Worker.select().order_by(Worker.first_seen, Worker.id)
        if state is not None:
            states = [state] if isinstance(state, (WorkerState, str)) else list(state)
            query = query.where(Worker.state.in_([WorkerState(s).value for s in states]))
        if min_cpus is not None:
            query = query.where(Worker.cpus >= min_cpus)
        if min_memory_bytes is not None:
            query = query.where(Worker.memory_bytes >= min_memory_bytes)
        if name is not None:
            query = query.where(Worker.name == name)
        records = [_worker_record(row) for row in dicts(query)]
        wanted = set(tags or ())
        return [r for r in records if wanted.issubset(r.tags)] if wanted else records

    @op
    def get_worker(self, id_or_name: str) -> WorkerRecord | None:
        """The worker with this id, else the only worker with this name; None otherwise."""
        Worker = self.models.Worker
        rows = dicts(Worker.select().where(Worker.id == id_or_name))
        if not rows:
            rows = dicts(Worker.select().where(Worker.name == id_or_name).limit(2))
            if len(rows) > 1:
                log.debug("worker name %r is ambiguous", id_or_name)
                return None
        return _worker_record(rows[0]) if rows else None

    @op
    def live_worker_deadlines(self) -> list[tuple[str, float, float]]:
        """``(wid, last_seen, heartbeat_interval)`` of ONLINE/DRAINING workers.

        A restarted coordinator rebuilds its liveness timers from these.
        """
        Worker = self.models.Worker
        query = (
            Worker.select(Worker.id, Worker.last_seen, Worker.heartbeat_interval)
            .where(Worker.state.in_([s.value for s in LIVE_STATES]))
            .order_by(Worker.id)
        )
        return [(wid, last_seen, interval) for wid, last_seen, interval in tuples(query)]

    @op
    def worker_events(self, wid: str, limit: int = 100) -> list[WorkerEventRecord]:
        """The worker's latest ``limit`` transitions, newest first."""
        WorkerEvent = self.models.WorkerEvent
        query = (
            WorkerEvent.select()
            .where(WorkerEvent.worker_id == wid)
            .order_by(WorkerEvent.id.desc())
            .limit(max(0, limit))
        )
        return [
            WorkerEventRecord(
                id=row.id,
                worker_id=row.worker_id,
                ts=row.ts,
                old_state=WorkerState(row.old_state) if row.old_state else None,
                new_state=WorkerState(row.new_state),
                reason=row.reason,
            )
            for row in query
        ]

    @op
    def worker_names(self, wids: Iterable[str]) -> dict[str, str]:
        """``{wid: name}`` of the known workers among ``wids`` (for listings)."""
        Worker = self.models.Worker
        names: dict[str, str] = {}
        for chunk in chunks(list(dict.fromkeys(wids)), IN_CHUNK):
            query = Worker.select(Worker.id, Worker.name).where(Worker.id.in_(list(chunk)))
            names.update(tuples(query))
        return names
