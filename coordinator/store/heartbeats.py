"""Heartbeats: the batched write path (samples plus each worker's latest metrics).

Heartbeats arrive by the thousand per second; ``record_heartbeats`` writes a whole batch in
one transaction with hand-written bulk SQL (``HeartbeatSQL``), since peewee's per-row
query building is the bottleneck at that rate. docs/storage.md has the measurements.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from peewee import Database

from coordinator.models import BoundModels
from coordinator.store.engine import StoreBase, Target, op
from coordinator.store.values import IN_CHUNK, INT32, as_float, as_int, chunks, dumps
from coordinator.worker_state import WorkerState

MYSQL_UPDATE_ROWS = 500  # rows per UPDATE ... JOIN statement
MYSQL_UPDATE_BYTES = 512 * 1024  # and bytes, well under max_allowed_packet
_INACTIVE = frozenset({WorkerState.LOST.value, WorkerState.OFFLINE.value})


@dataclass(frozen=True, slots=True)
class HeartbeatReport:
    """What ``record_heartbeats`` did.

    ``unknown``: worker ids never seen (ask them for their caps); ``inactive``: ids that were
    LOST or OFFLINE when their heartbeat arrived (the caller brings them back online).
    """

    accepted: int
    unknown: list[str]
    inactive: list[str]


def _sample_row(wid: str, body: dict[str, Any], ts: float) -> tuple[Any, ...]:
    running = body.get("running")
    return (
        wid,
        ts,
        as_float(body.get("cpu_percent")),
        as_float(body.get("load1")),
        as_int(body.get("mem_used_bytes")),
        as_int(body.get("mem_available_bytes")),
        as_int(body.get("disk_free_bytes")),
        as_int(body.get("net_sent_bytes")),
        as_int(body.get("net_recv_bytes")),
        len(running) if isinstance(running, list) else 0,
    )


def _update_row(wid: str, body: dict[str, Any], ts: float) -> tuple[Any, ...]:
    interval = as_float(body.get("interval_s"))
    return (
        ts,
        ts,
        dumps(body),
        as_int(body.get("free_slots"), INT32),
        as_int(body.get("seq")),
        interval if interval is not None and interval > 0 else None,
        wid,
    )


class HeartbeatStore(StoreBase):
    """The heartbeat ingest of the store."""

    def __init__(self, db: Database, target: Target) -> None:
        super().__init__(db, target)
        self._heartbeat_sql = HeartbeatSQL(db, target.backend, self.models)

    @op
    def record_heartbeats(
        self, batch: Sequence[tuple[str, dict[str, Any], float]]
    ) -> HeartbeatReport:
        """Store a batch of heartbeats ``(wid, body, received_at)`` in one transaction.

        Every heartbeat of a known worker becomes a WorkerSample row; each worker's row is
        updated once, from its latest heartbeat in the batch. Malformed numbers are stored
        as NULL rather than failing the batch.
        """
        if not batch:
            return HeartbeatReport(0, [], [])
        sql = self._heartbeat_sql
        wids = list(dict.fromkeys(wid for wid, _, _ in batch if isinstance(wid, str)))
        samples: list[tuple[Any, ...]] = []
        latest: dict[str, tuple[dict[str, Any], float]] = {}
        with self.db.atomic():
            states = sql.states_of(self.db, wids)
            for wid, body, ts in batch:
                if wid not in states or not isinstance(body, dict):
                    continue
                samples.append(_sample_row(wid, body, ts))
                previous = latest.get(wid)
                if previous is None or ts >= previous[1]:
                    latest[wid] = (body, ts)
            updates = [_update_row(wid, body, ts) for wid, (body, ts) in sorted(latest.items())]
            sql.write(self.db, samples, updates)
        return HeartbeatReport(
            accepted=len(samples),
            unknown=[wid for wid in wids if wid not in states],
            inactive=[wid for wid in wids if states.get(wid) in _INACTIVE],
        )


class HeartbeatSQL:
    """Hand-written bulk SQL for heartbeat ingest: peewee's per-row query building is the
    bottleneck at tens of thousands of rows per second.

    Samples: one prepared INSERT run with ``executemany`` (SQLite runs it in C; PyMySQL
    rewrites it into multi-row INSERTs capped at ~1 MB, below max_allowed_packet).
    Worker rows: SQLite ``executemany`` of one UPDATE; MySQL one ``UPDATE ... JOIN`` over a
    derived table per chunk, since PyMySQL would send UPDATEs one round trip each.
    """

    SAMPLE_COLUMNS = (
        "worker_id",
        "ts",
        "cpu_percent",
        "load1",
        "mem_used_bytes",
        "mem_available_bytes",
        "disk_free_bytes",
        "net_sent_bytes",
        "net_recv_bytes",
        "running",
    )
    SET = ("last_seen", "last_heartbeat_at", "last_metrics")
    KEEP_IF_NULL = ("free_slots", "heartbeat_seq", "heartbeat_interval")

    def __init__(self, db: Database, backend: str, models: BoundModels) -> None:
        self.backend = backend
        self._quote = db.quote
        p = db.param
        sample_table = self._q(models.WorkerSample._meta.table_name)
        self.insert_samples = (
            f"INSERT INTO {sample_table} ({', '.join(map(self._q, self.SAMPLE_COLUMNS))}) "
            f"VALUES ({', '.join([p] * len(self.SAMPLE_COLUMNS))})"
        )
        worker = self._q(models.Worker._meta.table_name)
        sets = [f"{self._q(c)} = {p}" for c in self.SET]
        sets += [f"{self._q(c)} = COALESCE({p}, {self._q(c)})" for c in self.KEEP_IF_NULL]
        self.update_worker = f"UPDATE {worker} SET {', '.join(sets)} WHERE {self._q('id')} = {p}"
        self.worker_table = worker
        self._select_states = f"SELECT {self._q('id')}, {self._q('state')} FROM {worker} WHERE "
        self._param = p

    def states_of(self, db: Database, wids: Sequence[str]) -> dict[str, str]:
        """``{wid: state}`` of the known workers among ``wids``."""
        states: dict[str, str] = {}
        for chunk in chunks(wids, IN_CHUNK):
            marks = ", ".join([self._param] * len(chunk))
            cursor = db.execute_sql(f"{self._select_states}{self._q('id')} IN ({marks})", chunk)
            states.update(cursor.fetchall())
        return states

    def write(
        self, db: Database, samples: list[tuple[Any, ...]], updates: list[tuple[Any, ...]]
    ) -> None:
        """Insert ``samples`` and apply ``updates``; call inside a transaction."""
        cursor = db.cursor()
        try:
            if samples:
                cursor.executemany(self.insert_samples, samples)
            if not updates:
                return
            if self.backend == "sqlite":
                cursor.executemany(self.update_worker, updates)
            else:
                for chunk in self._mysql_chunks(updates):
                    cursor.execute(
                        self._mysql_update_sql(len(chunk)), [v for row in chunk for v in row]
                    )
        finally:
            cursor.close()

    def _mysql_chunks(self, updates: list[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
        chunk: list[tuple[Any, ...]] = []
        size = 0
        for row in updates:
            chunk.append(row)
            size += len(row[2]) + 200
            if len(chunk) >= MYSQL_UPDATE_ROWS or size >= MYSQL_UPDATE_BYTES:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    def _q(self, name: str) -> str:
        return f"{self._quote[0]}{name}{self._quote[1]}"

    def _mysql_update_sql(self, rows: int) -> str:
        """``UPDATE worker JOIN (SELECT .. UNION ALL SELECT ..) v`` for ``rows`` rows."""
        names = [*self.SET, *self.KEEP_IF_NULL, "id"]
        first = "SELECT " + ", ".join(f"%s AS {self._q(n)}" for n in names)
        rest = " UNION ALL SELECT " + ", ".join(["%s"] * len(names))
        derived = first + rest * (rows - 1)
        sets = [f"w.{self._q(c)} = v.{self._q(c)}" for c in self.SET]
        sets += [
            f"w.{self._q(c)} = COALESCE(v.{self._q(c)}, w.{self._q(c)})" for c in self.KEEP_IF_NULL
        ]
        join = f"JOIN ({derived}) AS v ON w.{self._q('id')} = v.{self._q('id')}"
        return f"UPDATE {self.worker_table} AS w {join} SET {', '.join(sets)}"
