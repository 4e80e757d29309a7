"""What the dashboard's JSON API returns: records and stored series as JSON-ready dicts.

Pure functions, no I/O. Reservations and audit records use the bus's own wire format
(``coordinator.wire``), so the page and ``xcloud`` show the same fields. Series are
columnar (``{"t": [...], "cpu": [...], ...}``), which is what uPlot draws, with ``None``
for gaps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from coordinator import wire
from coordinator.monitoring.rollup import gpu_usage
from coordinator.store import ReservationRecord, WorkerEventRecord, WorkerRecord
from coordinator.store.metrics import GRID_COLUMNS, RAW_COLUMNS, WORKER_COLUMNS

CAPS_KEYS = ("host", "cpu", "memory_bytes", "disk_total_bytes", "executors", "gpus",
             "agent_version", "slots", "heartbeat_s")
RAW_GAP_FACTOR = 3.0  # samples further apart than this many intervals leave a gap


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def holder_of(reservation: ReservationRecord | None, viewer: str, admin: bool
              ) -> dict[str, Any] | None:
    """What a viewer may see of a worker's reservation: the holder's name for admins and
    for the holder; only that it is reserved for everybody else."""
    if reservation is None:
        return None
    seen: dict[str, Any] = {"state": reservation.state.value}
    if admin or reservation.client_id == viewer:
        seen.update(client=reservation.client_id, id=reservation.id,
                    expires_at=reservation.expires_at)
    return seen


def worker_row(record: WorkerRecord, reservation: dict[str, Any] | None, execs: int
               ) -> dict[str, Any]:
    """A worker for the workers table: caps summary, current load, holder, last seen."""
    row = wire.worker_summary(record)
    metrics = record.last_metrics
    for key, short in (("cpu_percent", "cpu"), ("load1", "load"), ("mem_used_bytes", "mem"),
                       ("mem_available_bytes", "mem_available")):
        value = _num(metrics.get(key))
        if value is not None:
            row[short] = value
    gpus = record.caps.get("gpus")
    row["gpus"] = len(gpus) if isinstance(gpus, list) else 0
    gpu, _mem = gpu_usage(metrics)
    if gpu is not None:
        row["gpu"] = gpu
    row.update(state_reason=record.state_reason, state_changed_at=record.state_changed_at,
               last_heartbeat_at=record.last_heartbeat_at, heartbeat_interval=
               record.heartbeat_interval, execs=execs, reservation=reservation)
    return row


def worker_detail(record: WorkerRecord, events: Iterable[WorkerEventRecord],
                  reservation: dict[str, Any] | None, execs: int) -> dict[str, Any]:
    """One worker's page: the row, the caps that matter, latest metrics, state history."""
    detail = worker_row(record, reservation, execs)
    detail["caps"] = {k: record.caps[k] for k in CAPS_KEYS if k in record.caps}
    detail["last_metrics"] = record.last_metrics
    detail["first_seen"] = record.first_seen
    detail["events"] = [
        {"ts": e.ts, "old_state": e.old_state.value if e.old_state else None,
         "new_state": e.new_state.value, "reason": e.reason}
        for e in events
    ]
    return detail


def raw_series(rows: Sequence[Sequence[Any]], interval: float) -> dict[str, list[Any]]:
    """Columns from raw samples (``RAW_COLUMNS``); network rates from counter deltas."""
    index = {c: i for i, c in enumerate(RAW_COLUMNS)}
    out: dict[str, list[Any]] = {k: [] for k in ("t", "cpu", "load", "mem", "disk_free",
                                                 "rx", "tx", "running")}
    previous: Sequence[Any] | None = None
    for row in rows:
        ts = float(row[index["ts"]])
        if previous is not None and ts - float(previous[index["ts"]]) > RAW_GAP_FACTOR * max(
                interval, 0.1):
            _gap(out, (ts + float(previous[index["ts"]])) / 2)
        out["t"].append(ts)
        out["cpu"].append(_num(row[index["cpu_percent"]]))
        out["load"].append(_num(row[index["load1"]]))
        out["mem"].append(_num(row[index["mem_used_bytes"]]))
        out["disk_free"].append(_num(row[index["disk_free_bytes"]]))
        out["running"].append(row[index["running"]])
        rx = tx = None
        if previous is not None:
            dt = ts - float(previous[index["ts"]])
            rates = [_rate(row[index[c]], previous[index[c]], dt)
                     for c in ("net_recv_bytes", "net_sent_bytes")]
            rx, tx = rates
        out["rx"].append(rx)
        out["tx"].append(tx)
        previous = row
    return out


def _rate(now: Any, then: Any, dt: float) -> float | None:
    a, b = _num(now), _num(then)
    if a is None or b is None or dt <= 0 or a < b:
        return None
    return (a - b) / dt


def _gap(out: dict[str, list[Any]], at: float) -> None:
    out["t"].append(at)
    for key, values in out.items():
        if key != "t":
            values.append(None)


def bucket_series(rows: Sequence[Sequence[Any]], res: int) -> dict[str, list[Any]]:
    """Columns from stored buckets (``WORKER_COLUMNS``): averages plus min/max bands."""
    i = {c: n for n, c in enumerate(WORKER_COLUMNS)}
    keys = ("t", "cpu", "cpu_min", "cpu_max", "load", "mem", "mem_max", "disk_free", "rx",
            "rx_max", "tx", "tx_max", "gpu", "gpu_max", "gpu_mem", "running")
    out: dict[str, list[Any]] = {k: [] for k in keys}
    last: float | None = None
    for row in rows:
        ts = float(row[i["ts"]])
        if last is not None and ts - last > 1.5 * res:
            _gap(out, last + res)
        last = ts
        n = row[i["n"]] or 0
        out["t"].append(ts)
        out["cpu"].append(_avg(row[i["cpu_sum"]], n))
        out["cpu_min"].append(_num(row[i["cpu_min"]]))
        out["cpu_max"].append(_num(row[i["cpu_max"]]))
        out["load"].append(_avg(row[i["load_sum"]], row[i["load_n"]]))
        out["mem"].append(_avg(row[i["mem_sum"]], n))
        out["mem_max"].append(_num(row[i["mem_max"]]))
        out["disk_free"].append(_num(row[i["disk_min"]]))
        out["rx"].append(_avg(row[i["rx_sum"]], row[i["net_n"]]))
        out["rx_max"].append(_num(row[i["rx_max"]]))
        out["tx"].append(_avg(row[i["tx_sum"]], row[i["net_n"]]))
        out["tx_max"].append(_num(row[i["tx_max"]]))
        out["gpu"].append(_avg(row[i["gpu_sum"]], row[i["gpu_n"]]))
        out["gpu_max"].append(_num(row[i["gpu_max"]]))
        out["gpu_mem"].append(_avg(row[i["gpu_mem_sum"]], row[i["gpu_n"]]))
        out["running"].append(row[i["run_max"]])
    return out


def _avg(total: Any, count: Any) -> float | None:
    if not count:
        return None
    value = _num(total)
    return None if value is None else value / float(count)


def grid_series(rows: Sequence[Sequence[Any]], names: Sequence[str]) -> dict[str, list[Any]]:
    """Columns of grid-wide averages (``GRID_COLUMNS`` rows), one time axis for all."""
    i = {c: n for n, c in enumerate(GRID_COLUMNS)}
    by_time: dict[float, dict[str, float | None]] = {}
    for row in rows:
        by_time.setdefault(float(row[i["ts"]]), {})[row[i["series"]]] = _avg(
            row[i["sum"]], row[i["n"]])
    times = sorted(by_time)
    out: dict[str, list[Any]] = {"t": times}
    for name in names:
        out[name] = [by_time[t].get(name) for t in times]
    return out


def reservation_row(record: ReservationRecord, worker_name: str | None) -> dict[str, Any]:
    return wire.reservation(record, worker_name)
