"""The roll-up: heartbeat samples become downsampled buckets, tiers fold into coarser
tiers, and retention keeps every table bounded. docs/monitoring.md has the picture.

It runs in the monitoring thread, never on the heartbeat ingest path: it reads what the
heartbeat writer committed, by sample id (one writer, so ids commit in order), and keeps
its place in ``xc_metric_cursor``. Work per pass is bounded: at most ``batch`` samples,
``fold_rows`` source rows per fold statement and ``fold_steps`` statements per tier,
``delete_budget`` deleted rows. A grid that falls behind catches up over several passes.

Buckets of the finest tier may still be open (merged into as samples arrive); a coarser
tier folds only complete buckets of the tier below, once ``settle_s`` has passed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from coordinator.monitoring.tiers import GRID_RES, Tier
from coordinator.store import Store
from coordinator.store.metrics import CursorMoved

log = logging.getLogger(__name__)

RAW_CURSOR = "raw"
MAX_RATE_GAP_S = 600.0  # counters further apart than this give no rate
NET_STATE_MAX = 100_000  # remembered counters (one per worker)


def cursor_name(kind: str, res: int) -> str:
    return f"{kind}:{res}"


class _Bucket:
    """A partial worker bucket; ``row()`` in ``WORKER_COLUMNS`` order."""

    __slots__ = (
        "cpu",
        "disk",
        "gpu",
        "gpu_mem",
        "load",
        "mem",
        "n",
        "net",
        "res",
        "run",
        "ts",
        "wid",
    )

    def __init__(self, wid: str, res: int, ts: int) -> None:
        self.wid, self.res, self.ts = wid, res, ts
        self.n = 0
        self.cpu = _Stat()
        self.mem = _Stat()
        self.load = _Stat()
        self.disk = _Stat()
        self.net = (_Stat(), _Stat())
        self.gpu = _Stat()
        self.gpu_mem = _Stat()
        self.run: int | None = None

    def row(self) -> tuple[Any, ...]:
        rx, tx = self.net
        return (self.wid, self.res, self.ts, self.n,
                self.cpu.low, self.cpu.total, self.cpu.high,
                self.mem.low, self.mem.total, self.mem.high,
                self.load.n, self.load.total, self.load.high, self.disk.low,
                rx.n, rx.total, rx.high, tx.total, tx.high,
                self.gpu.n, self.gpu.total, self.gpu.high, self.gpu_mem.total,
                self.gpu_mem.high, self.run)


class _Stat:
    __slots__ = ("high", "low", "n", "total")

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.low: float | None = None
        self.high: float | None = None

    def add(self, value: float | None) -> None:
        if value is None:
            return
        self.n += 1
        self.total += value
        self.low = value if self.low is None or value < self.low else self.low
        self.high = value if self.high is None or value > self.high else self.high


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def gpu_usage(metrics: Any) -> tuple[float | None, float | None]:
    """(mean utilisation %, total memory used) of a heartbeat's ``gpus`` list."""
    gpus = metrics.get("gpus") if isinstance(metrics, dict) else None
    if not isinstance(gpus, list):
        return None, None
    utils = [u for u in (_num(g.get("util_percent")) for g in gpus if isinstance(g, dict))
             if u is not None]
    mems = [m for m in (_num(g.get("memory_used_bytes")) for g in gpus if isinstance(g, dict))
            if m is not None]
    return (sum(utils) / len(utils) if utils else None, sum(mems) if mems else None)


@dataclass
class PassReport:
    """What one pass did (logged at debug, returned to tests and the benchmark)."""

    samples: int = 0
    gpu_readings: int = 0
    behind: bool = False
    folded: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)


class Rollup:
    """Folds and prunes the time-series tables of one store (see the module docstring)."""

    def __init__(self, store: Store, *, raw_retention_s: float, tiers: Sequence[Tier],
                 batch: int = 20_000, fold_rows: int = 200_000, fold_steps: int = 16,
                 delete_chunk: int = 5_000, delete_budget: int = 200_000,
                 settle_s: float = 30.0) -> None:
        self.store = store
        self.raw_retention_s = raw_retention_s
        self.tiers = list(tiers)
        self.batch = batch
        self.fold_rows = fold_rows
        self.fold_steps = fold_steps
        self.delete_chunk = delete_chunk
        self.delete_budget = delete_budget
        self.settle_s = settle_s
        self.horizon_s = max(t.retention_s for t in self.tiers)
        self._net: dict[str, tuple[float, float | None, float | None]] = {}
        self._gpu_since: float | None = None
        self._watermark: float | None = None  # finest tier complete up to (raw time)

    # ---- one pass

    def run(self, now: float) -> PassReport:
        report = PassReport()
        self.fold_raw(now, report)
        self.fold_tiers(now, report)
        self.retain(now, report)
        return report

    # ---- raw samples -> the finest tier

    def fold_raw(self, now: float, report: PassReport) -> None:
        res = self.tiers[0].res
        old = self.store.metric_cursor(RAW_CURSOR)
        if old is None:  # first pass on this database: skip what retention would drop
            first = self.store.first_raw_id_since(now - self.horizon_s)
            after = first - 1 if first is not None else self.store.max_raw_id()
        else:
            after = int(old)
        rows = self.store.raw_samples_after(after, self.batch)
        buckets: dict[tuple[str, int], _Bucket] = {}
        for row in rows:
            self._add_sample(buckets, res, row)
        since = self._gpu_since if self._gpu_since is not None else now - 60.0
        readings = self.store.gpu_readings(since, self.batch)
        newest_gpu = since
        for wid, at, text in readings:
            util, mem = gpu_usage(json.loads(text) if text else None)
            if util is None and mem is None:
                continue
            ts = int(at // res * res)
            bucket = buckets.get((wid, ts))
            if bucket is None:
                bucket = buckets[(wid, ts)] = _Bucket(wid, res, ts)
            bucket.gpu.add(util)
            bucket.gpu_mem.add(mem)
            newest_gpu = max(newest_gpu, at)
        new = float(rows[-1][0]) if rows else float(after)
        if old is None or new != old or buckets:
            try:
                self.store.merge_worker_buckets([b.row() for b in buckets.values()],
                                                RAW_CURSOR, old, new, now)
            except CursorMoved:
                log.info("another coordinator rolled these samples up; following it")
                self._net.clear()
                return
        self._gpu_since = newest_gpu
        report.samples = len(rows)
        report.gpu_readings = len(readings)
        report.behind = len(rows) >= self.batch
        newest = float(rows[-1][2]) if report.behind else now
        self._watermark = newest - self.settle_s
        if len(self._net) > NET_STATE_MAX:
            self._net = {w: s for w, s in self._net.items() if now - s[0] < MAX_RATE_GAP_S}

    def _add_sample(self, buckets: dict[tuple[str, int], _Bucket], res: int,
                    row: Sequence[Any]) -> None:
        _id, wid, ts, cpu, load1, mem, disk, sent, recv, running = row
        ts = float(ts)
        key = (wid, int(ts // res * res))
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket(wid, res, key[1])
        bucket.n += 1
        bucket.cpu.add(_num(cpu))
        bucket.mem.add(_num(mem))
        bucket.load.add(_num(load1))
        bucket.disk.add(_num(disk))
        if running is not None:
            bucket.run = max(bucket.run or 0, int(running))
        rx_now, tx_now = _num(recv), _num(sent)
        previous = self._net.get(wid)
        self._net[wid] = (ts, rx_now, tx_now)
        if previous is None or rx_now is None or tx_now is None:
            return
        then, rx_then, tx_then = previous
        dt = ts - then
        if not 0 < dt <= MAX_RATE_GAP_S or rx_then is None or tx_then is None:
            return
        if rx_now < rx_then or tx_now < tx_then:
            return  # counters reset (the worker restarted)
        bucket.net[0].add((rx_now - rx_then) / dt)
        bucket.net[1].add((tx_now - tx_then) / dt)

    # ---- tier -> coarser tier

    def fold_tiers(self, now: float, report: PassReport) -> None:
        if self._watermark is None:
            return
        finest = self.tiers[0].res
        worker_levels = [(a.res, b.res) for a, b in zip(self.tiers, self.tiers[1:])]
        self._fold_chain("worker", worker_levels, self._watermark // finest * finest,
                         now, report)
        grid_levels = [(GRID_RES, self.tiers[0].res), *worker_levels]
        self._fold_chain("grid", grid_levels, now // GRID_RES * GRID_RES, now, report)

    def _fold_chain(self, kind: str, levels: list[tuple[int, int]], complete: float,
                    now: float, report: PassReport) -> None:
        """Fold each level in turn; ``complete``: source buckets before it are final."""
        for source_res, res in levels:
            name = cursor_name(kind, res)
            old = self.store.metric_cursor(name)
            if old is None:
                first = self.store.first_bucket_at(kind, source_res)
                if first is None:
                    return
                start = first - first % res
            else:
                start = int(old)
            limit = int(complete // res * res)
            written = 0
            for _step in range(self.fold_steps):
                if start >= limit:
                    break
                end = self._fold_end(kind, source_res, res, start, limit)
                try:
                    written += self.store.fold_buckets(kind, source_res, res, start, end,
                                                       name, old, now)
                except CursorMoved:
                    log.info("another coordinator folded %s; following it", name)
                    return
                old, start = float(end), end
            if written:
                report.folded[name] = report.folded.get(name, 0) + written
            complete = start  # this tier is final up to its cursor

    def _fold_end(self, kind: str, source_res: int, res: int, start: int, limit: int) -> int:
        """Where one fold step from ``start`` ends: over a gap in one jump, else as many
        buckets as keep the source rows under ``fold_rows``."""
        following = self.store.first_bucket_at(kind, source_res, since=start)
        if following is None or following >= limit:
            return limit
        aligned = following - following % res
        if aligned > start:
            return aligned
        per_bucket = max(1, self.store.bucket_width(kind, source_res, following))
        periods = max(1, self.fold_rows // (per_bucket * (res // source_res)))
        return min(limit, start + res * periods)

    # ---- retention

    def retain(self, now: float, report: PassReport) -> None:
        budget = self.delete_budget
        raw_cursor = self.store.metric_cursor(RAW_CURSOR)
        if raw_cursor is not None:
            budget = self._drain(report, "raw", budget, partial(
                self.store.delete_raw_samples, now - self.raw_retention_s, int(raw_cursor),
                self.delete_chunk))
        grid_first = self.store.metric_cursor(cursor_name("grid", self.tiers[0].res))
        if grid_first is not None:
            cutoff = min(now - self.raw_retention_s, grid_first)
            budget = self._drain(report, cursor_name("grid", GRID_RES), budget, partial(
                self.store.delete_buckets, "grid", GRID_RES, cutoff, self.delete_chunk))
        for kind in ("worker", "grid"):
            for index, tier in enumerate(self.tiers):
                cutoff = now - tier.retention_s
                if index + 1 < len(self.tiers):  # only what the next tier already holds
                    folded = self.store.metric_cursor(
                        cursor_name(kind, self.tiers[index + 1].res))
                    if folded is None:
                        continue
                    cutoff = min(cutoff, folded)
                budget = self._drain(report, cursor_name(kind, tier.res), budget, partial(
                    self.store.delete_buckets, kind, tier.res, cutoff, self.delete_chunk))

    @staticmethod
    def _drain(report: PassReport, name: str, budget: int, step: Callable[[], int]) -> int:
        while budget > 0:
            gone = step()
            if gone <= 0:
                break
            budget -= gone
            report.deleted[name] = report.deleted.get(name, 0) + gone
        return budget
