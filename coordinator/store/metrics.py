"""Stored time series: the SQL of the roll-up, the retention and the dashboard's reads.

Three tables (schema version 3, ``coordinator.models``): ``xc_worker_metric`` (a worker's
heartbeat metrics per tier and bucket, as counts, sums, minima and maxima),
``xc_grid_metric`` (grid-wide series, same shape, one row per series) and
``xc_metric_cursor`` (how far the roll-up got). What to fold when is decided by
``coordinator.monitoring.rollup``; this module only runs statements, each write in one
transaction with a compare-and-set of its cursor, so a crash or a second coordinator on
the same database never folds a row twice.

Everything here is bounded: reads take a ``limit``, deletes remove at most about
``chunk`` rows per statement, folds cover a caller-chosen time range.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from peewee import IntegrityError

from coordinator.reservation_state import LIVE_STATES as LIVE_RESERVATIONS
from coordinator.store.engine import StoreBase, op

WORKER_KEYS = ("worker_id", "res", "ts")
WORKER_STATS = (
    "n", "cpu_min", "cpu_sum", "cpu_max", "mem_min", "mem_sum", "mem_max",
    "load_n", "load_sum", "load_max", "disk_min",
    "net_n", "rx_sum", "rx_max", "tx_sum", "tx_max",
    "gpu_n", "gpu_sum", "gpu_max", "gpu_mem_sum", "gpu_mem_max", "run_max",
)
WORKER_COLUMNS = WORKER_KEYS + WORKER_STATS
GRID_KEYS = ("series", "res", "ts")
GRID_STATS = ("n", "sum", "min", "max")
GRID_COLUMNS = GRID_KEYS + GRID_STATS
RAW_COLUMNS = ("id", "worker_id", "ts", "cpu_percent", "load1", "mem_used_bytes",
               "disk_free_bytes", "net_sent_bytes", "net_recv_bytes", "running")
GPU_MARK = '%"gpus":[{%'  # last_metrics as written by store.values.dumps (no spaces)


def merge_kind(column: str) -> str:
    """How two partial buckets combine in ``column``: add, min or max."""
    if column == "n" or column.endswith(("_n", "_sum")) or column == "sum":
        return "add"
    if column.endswith("_min") or column == "min":
        return "min"
    return "max"


class CursorMoved(Exception):
    """Another writer moved a roll-up cursor first; this fold was rolled back."""


@dataclass(frozen=True, slots=True)
class TableSize:
    """Rows of one metrics table (and bytes where the database tells cheaply)."""

    table: str
    rows: int
    bytes: int | None


class MetricsStore(StoreBase):
    """The time-series tables (see the module docstring)."""

    # ---- SQL text, built once per store (dialects differ in upserts)

    def _q(self, name: str) -> str:
        return f"{self.db.quote[0]}{name}{self.db.quote[1]}"

    def _table(self, kind: str) -> str:
        model = {"worker": self.models.WorkerMetric, "grid": self.models.GridMetric,
                 "raw": self.models.WorkerSample, "workers": self.models.Worker,
                 "reservations": self.models.Reservation,
                 "audit": self.models.ExecAudit}[kind]
        return self._q(model._meta.table_name)

    def _merge_sql(self, kind: str) -> str:
        """INSERT of one bucket that merges into an existing one (counts and sums add,
        minima and maxima keep the extreme; NULL means "no value")."""
        columns, keys = (WORKER_COLUMNS, WORKER_KEYS) if kind == "worker" else (
            GRID_COLUMNS, GRID_KEYS)
        sqlite = self.backend == "sqlite"
        sets = []
        for col in columns:
            if col in keys:
                continue
            old = self._q(col)
            new = f"excluded.{old}" if sqlite else f"VALUES({old})"
            how = merge_kind(col)
            if how == "add":
                expr = f"{old} + {new}"
            else:
                fn = ("MIN" if how == "min" else "MAX") if sqlite else (
                    "LEAST" if how == "min" else "GREATEST")
                expr = f"COALESCE({fn}({old}, {new}), {old}, {new})"
            sets.append(f"{old} = {expr}")
        names = ", ".join(self._q(c) for c in columns)
        marks = ", ".join([self.db.param] * len(columns))
        insert = f"INSERT INTO {self._table(kind)} ({names}) VALUES ({marks})"
        if sqlite:
            conflict = ", ".join(self._q(k) for k in keys)
            return f"{insert} ON CONFLICT ({conflict}) DO UPDATE SET {', '.join(sets)}"
        return f"{insert} ON DUPLICATE KEY UPDATE {', '.join(sets)}"

    def _fold_sql(self, kind: str, source_res: int, res: int) -> str:
        """``REPLACE INTO`` the ``res`` buckets aggregated from ``source_res`` buckets in a
        time range (two parameters: start, end). Resolutions are checked integers."""
        res, source_res = int(res), int(source_res)
        columns, keys = (WORKER_COLUMNS, WORKER_KEYS) if kind == "worker" else (
            GRID_COLUMNS, GRID_KEYS)
        ident = self._q(keys[0])
        ts = self._q("ts")
        mod = "%%" if self.backend == "mysql" else "%"  # PyMySQL's paramstyle is "format"
        bucket = f"{ts} - {ts} {mod} {res}"
        aggregates = []
        for col in columns:
            if col in keys:
                continue
            fn = {"add": "SUM", "min": "MIN", "max": "MAX"}[merge_kind(col)]
            aggregates.append(f"{fn}({self._q(col)})")
        names = ", ".join(self._q(c) for c in columns)
        p = self.db.param
        return (f"REPLACE INTO {self._table(kind)} ({names}) "
                f"SELECT {ident}, {res}, {bucket}, {', '.join(aggregates)} "
                f"FROM {self._table(kind)} WHERE {self._q('res')} = {source_res} "
                f"AND {ts} >= {p} AND {ts} < {p} GROUP BY {ident}, {bucket}")

    # ---- cursors

    @op
    def metric_cursor(self, name: str) -> float | None:
        Cursor = self.models.MetricCursor
        row = Cursor.select(Cursor.value).where(Cursor.name == name).tuples().first()
        return None if row is None else float(row[0])

    def _move_cursor(self, name: str, old: float | None, new: float, now: float) -> None:
        """Compare-and-set inside the caller's transaction; ``CursorMoved`` if it lost."""
        Cursor = self.models.MetricCursor
        if old is None:
            try:
                with self.db.atomic():  # a savepoint: a duplicate must not poison the rest
                    Cursor.insert(name=name, value=new, updated_at=now).execute()
            except IntegrityError:
                raise CursorMoved(name) from None
            return
        moved = Cursor.update(value=new, updated_at=now).where(
            (Cursor.name == name) & (Cursor.value == old)).execute()
        if moved != 1:
            raise CursorMoved(name)

    # ---- folding

    @op
    def raw_samples_after(self, after_id: int, limit: int) -> list[tuple[Any, ...]]:
        """Heartbeat samples with ``id > after_id``, oldest first (``RAW_COLUMNS``)."""
        names = ", ".join(self._q(c) for c in RAW_COLUMNS)
        p = self.db.param
        sql = (f"SELECT {names} FROM {self._table('raw')} WHERE {self._q('id')} > {p} "
               f"ORDER BY {self._q('id')} LIMIT {int(limit)}")
        return list(self.db.execute_sql(sql, (int(after_id),)).fetchall())

    @op
    def first_raw_id_since(self, ts: float) -> int | None:
        """The first sample id at or after ``ts`` (where a new roll-up starts); one scan."""
        p = self.db.param
        sql = (f"SELECT MIN({self._q('id')}) FROM {self._table('raw')} "
               f"WHERE {self._q('ts')} >= {p}")
        row = self.db.execute_sql(sql, (ts,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    @op
    def max_raw_id(self) -> int:
        row = self.db.execute_sql(f"SELECT MAX({self._q('id')}) FROM {self._table('raw')}"
                                  ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    @op
    def gpu_readings(self, since: float, limit: int) -> list[tuple[str, float, str]]:
        """``(wid, last_heartbeat_at, last_metrics)`` of workers whose latest heartbeat,
        newer than ``since``, reports GPUs (the raw sample rows have no GPU columns)."""
        p = self.db.param
        hb = self._q("last_heartbeat_at")
        sql = (f"SELECT {self._q('id')}, {hb}, {self._q('last_metrics')} "
               f"FROM {self._table('workers')} WHERE {hb} > {p} "
               f"AND {self._q('last_metrics')} LIKE {p} LIMIT {int(limit)}")
        return [(r[0], float(r[1]), r[2]) for r in self.db.execute_sql(sql, (since, GPU_MARK))]

    @op
    def merge_worker_buckets(self, rows: Sequence[Sequence[Any]], cursor: str,
                             old: float | None, new: float, now: float) -> None:
        """Merge partial buckets (``WORKER_COLUMNS`` order) and move ``cursor`` from
        ``old`` to ``new``, all or nothing (``CursorMoved`` when another writer won)."""
        sql = self._merge_sql("worker")
        with self.db.atomic():
            self._move_cursor(cursor, old, new, now)
            if rows:
                cur = self.db.cursor()
                try:
                    cur.executemany(sql, [tuple(r) for r in rows])
                finally:
                    cur.close()

    @op
    def merge_grid_samples(self, rows: Sequence[Sequence[Any]]) -> None:
        """Merge grid-wide samples (``GRID_COLUMNS`` order) into their buckets."""
        if not rows:
            return
        sql = self._merge_sql("grid")
        with self.db.atomic():
            cur = self.db.cursor()
            try:
                cur.executemany(sql, [tuple(r) for r in rows])
            finally:
                cur.close()

    @op
    def fold_buckets(self, kind: str, source_res: int, res: int, start: int, end: int,
                     cursor: str, old: float | None, now: float) -> int:
        """Fold the ``source_res`` buckets of ``[start, end)`` into ``res`` buckets and move
        ``cursor`` to ``end``; returns the rows written (``CursorMoved`` if it lost)."""
        with self.db.atomic():
            self._move_cursor(cursor, old, float(end), now)
            cur = self.db.execute_sql(self._fold_sql(kind, source_res, res), (start, end))
            return int(cur.rowcount or 0)

    @op
    def first_bucket_at(self, kind: str, res: int, since: float | None = None) -> int | None:
        """The oldest bucket start of resolution ``res`` (at or after ``since``)."""
        p = self.db.param
        sql = (f"SELECT MIN({self._q('ts')}) FROM {self._table(kind)} "
               f"WHERE {self._q('res')} = {p}")
        args: list[Any] = [int(res)]
        if since is not None:
            sql += f" AND {self._q('ts')} >= {p}"
            args.append(int(since))
        row = self.db.execute_sql(sql, args).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    @op
    def bucket_width(self, kind: str, res: int, ts: int) -> int:
        """Rows in one bucket (workers that reported in it; series for the grid)."""
        p = self.db.param
        sql = (f"SELECT COUNT(*) FROM {self._table(kind)} WHERE {self._q('res')} = {p} "
               f"AND {self._q('ts')} = {p}")
        return int(self.db.execute_sql(sql, (int(res), int(ts))).fetchone()[0])

    # ---- retention

    @op
    def delete_raw_samples(self, before_ts: float, up_to_id: int, chunk: int) -> int:
        """Delete at most ``chunk`` samples older than ``before_ts`` with ``id <= up_to_id``
        (never one the roll-up has not read); returns how many went."""
        table, ident, p = self._table("raw"), self._q("id"), self.db.param
        row = self.db.execute_sql(f"SELECT MIN({ident}) FROM {table}").fetchone()
        if row is None or row[0] is None or int(row[0]) > up_to_id:
            return 0
        high = min(int(up_to_id), int(row[0]) + int(chunk) - 1)
        cur = self.db.execute_sql(
            f"DELETE FROM {table} WHERE {ident} <= {p} AND {self._q('ts')} < {p}",
            (high, before_ts))
        return int(cur.rowcount or 0)

    @op
    def delete_buckets(self, kind: str, res: int, before_ts: float, chunk: int) -> int:
        """Delete buckets of ``res`` older than ``before_ts``, about ``chunk`` rows at most
        (whole buckets, oldest first); returns how many went."""
        table, ts, p = self._table(kind), self._q("ts"), self.db.param
        where = f"{self._q('res')} = {p}"
        row = self.db.execute_sql(f"SELECT MIN({ts}) FROM {table} WHERE {where}",
                                  (int(res),)).fetchone()
        if row is None or row[0] is None or row[0] >= before_ts:
            return 0
        oldest = int(row[0])
        per_bucket = self.db.execute_sql(
            f"SELECT COUNT(*) FROM {table} WHERE {where} AND {ts} = {p}",
            (int(res), oldest)).fetchone()[0]
        span = int(res) * max(1, int(chunk) // max(1, int(per_bucket)))
        cur = self.db.execute_sql(f"DELETE FROM {table} WHERE {where} AND {ts} < {p}",
                                  (int(res), min(before_ts, oldest + span)))
        return int(cur.rowcount or 0)

    # ---- reads for charts

    @op
    def raw_series(self, wid: str, start: float, end: float, limit: int
                   ) -> list[tuple[Any, ...]]:
        """One worker's samples in ``[start, end)`` (``RAW_COLUMNS``), oldest first."""
        names = ", ".join(self._q(c) for c in RAW_COLUMNS)
        p, ts = self.db.param, self._q("ts")
        sql = (f"SELECT {names} FROM {self._table('raw')} WHERE {self._q('worker_id')} = {p} "
               f"AND {ts} >= {p} AND {ts} < {p} ORDER BY {ts} LIMIT {int(limit)}")
        return list(self.db.execute_sql(sql, (wid, start, end)).fetchall())

    @op
    def worker_buckets(self, wid: str, res: int, start: float, end: float, limit: int
                       ) -> list[tuple[Any, ...]]:
        """One worker's ``res`` buckets in ``[start, end)`` (``WORKER_COLUMNS``)."""
        names = ", ".join(self._q(c) for c in WORKER_COLUMNS)
        p, ts = self.db.param, self._q("ts")
        sql = (f"SELECT {names} FROM {self._table('worker')} "
               f"WHERE {self._q('worker_id')} = {p} AND {self._q('res')} = {p} "
               f"AND {ts} >= {p} AND {ts} < {p} ORDER BY {ts} LIMIT {int(limit)}")
        return list(self.db.execute_sql(sql, (wid, int(res), start, end)).fetchall())

    @op
    def grid_buckets(self, res: int, start: float, end: float, series: Iterable[str],
                     limit: int) -> list[tuple[Any, ...]]:
        """Grid-wide buckets of ``res`` in ``[start, end)`` (``GRID_COLUMNS``), by time."""
        names = list(series)
        if not names:
            return []
        cols = ", ".join(self._q(c) for c in GRID_COLUMNS)
        p, ts = self.db.param, self._q("ts")
        marks = ", ".join([p] * len(names))
        sql = (f"SELECT {cols} FROM {self._table('grid')} WHERE {self._q('res')} = {p} "
               f"AND {ts} >= {p} AND {ts} < {p} AND {self._q('series')} IN ({marks}) "
               f"ORDER BY {ts} LIMIT {int(limit)}")
        return list(self.db.execute_sql(sql, (int(res), start, end, *names)).fetchall())

    # ---- snapshots of the grid (grid series, /metrics, live updates)

    @op
    def worker_state_totals(self) -> list[tuple[str, int, int, int]]:
        """``(state, workers, slots, free slots)`` per worker state."""
        q = self._q
        sql = (f"SELECT {q('state')}, COUNT(*), SUM({q('slots')}), SUM({q('free_slots')}) "
               f"FROM {self._table('workers')} GROUP BY {q('state')}")
        return [(str(r[0]), int(r[1]), int(r[2] or 0), int(r[3] or 0))
                for r in self.db.execute_sql(sql)]

    @op
    def live_reservation_counts(self) -> dict[str, int]:
        """Live reservations per state (ended ones are history, not a gauge)."""
        states = sorted(s.value for s in LIVE_RESERVATIONS)
        p, state = self.db.param, self._q("state")
        sql = (f"SELECT {state}, COUNT(*) FROM {self._table('reservations')} "
               f"WHERE {state} IN ({', '.join([p] * len(states))}) GROUP BY {state}")
        counts = dict.fromkeys(states, 0)
        counts.update({str(r[0]): int(r[1]) for r in self.db.execute_sql(sql, states)})
        return counts

    @op
    def reservation_digest(self) -> tuple[Any, ...]:
        """Changes whenever a reservation is created, ends or renews (live pages refetch)."""
        q = self._q
        sql = (f"SELECT COUNT(*), MAX({q('created_at')}), MAX({q('ended_at')}), "
               f"MAX({q('expires_at')}) FROM {self._table('reservations')}")
        row = self.db.execute_sql(sql).fetchone()
        return tuple(row) if row else ()

    @op
    def worker_changes(self, since: float, limit: int) -> list[tuple[Any, ...]]:
        """Workers heard from or moved since ``since``: ``(id, name, state, state_changed_at,
        slots, free_slots, last_seen, last_heartbeat_at, last_metrics)``."""
        q, p = self._q, self.db.param
        cols = ("id", "name", "state", "state_changed_at", "slots", "free_slots",
                "last_seen", "last_heartbeat_at", "last_metrics")
        sql = (f"SELECT {', '.join(q(c) for c in cols)} FROM {self._table('workers')} "
               f"WHERE {q('last_seen')} > {p} OR {q('state_changed_at')} > {p} "
               f"LIMIT {int(limit)}")
        return list(self.db.execute_sql(sql, (since, since)).fetchall())

    @op
    def live_worker_metrics(self, states: Sequence[str], limit: int
                            ) -> list[tuple[str, int, int, str]]:
        """``(id, slots, free_slots, last_metrics)`` of the workers in ``states``."""
        q, p = self._q, self.db.param
        sql = (f"SELECT {q('id')}, {q('slots')}, {q('free_slots')}, {q('last_metrics')} "
               f"FROM {self._table('workers')} WHERE {q('state')} IN "
               f"({', '.join([p] * len(states))}) ORDER BY {q('id')} LIMIT {int(limit)}")
        return list(self.db.execute_sql(sql, list(states)).fetchall())

    @op
    def exec_reports_after(self, after_id: int, limit: int) -> list[tuple[Any, ...]]:
        """``(id, duration_s, exit_code, signal, timed_out, error)`` of audit rows after
        ``after_id`` (the exec-duration histogram follows the audit writer's output)."""
        q, p = self._q, self.db.param
        sql = (f"SELECT {q('id')}, {q('duration_s')}, {q('exit_code')}, {q('signal')}, "
               f"{q('timed_out')}, {q('error')} FROM {self._table('audit')} "
               f"WHERE {q('id')} > {p} ORDER BY {q('id')} LIMIT {int(limit)}")
        return list(self.db.execute_sql(sql, (int(after_id),)).fetchall())

    @op
    def max_exec_report_id(self) -> int:
        row = self.db.execute_sql(
            f"SELECT MAX({self._q('id')}) FROM {self._table('audit')}").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    @op
    def metrics_table_sizes(self) -> list[TableSize]:
        """Rows (and bytes on MySQL/MariaDB) of the raw and downsampled tables. Counts every
        row: for tests and benchmarks, not for a request path."""
        sizes = []
        for kind in ("raw", "worker", "grid"):
            table = self._table(kind)
            rows = int(self.db.execute_sql(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            size: int | None = None
            if self.backend == "mysql":
                row = self.db.execute_sql(
                    "SELECT data_length + index_length FROM information_schema.tables "
                    "WHERE table_schema = DATABASE() AND table_name = %s",
                    (table.strip("`"),)).fetchone()
                size = int(row[0]) if row and row[0] is not None else None
            sizes.append(TableSize(table.strip('`"'), rows, size))
        return sizes
