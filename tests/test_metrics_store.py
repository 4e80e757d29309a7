"""The stored time series (coordinator/store/metrics.py, coordinator/monitoring/): roll-up,
tiers and retention on SQLite and MariaDB, with synthetic timestamps.

The bound test simulates two days of heartbeats from many workers (rows written directly,
a pass every few simulated minutes, retentions scaled down) and checks that every table
stops growing at the size its retention allows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest

from broker.config import MonitoringConfig
from coordinator.monitoring.rollup import RAW_CURSOR, Rollup, gpu_usage
from coordinator.monitoring.service import MonitoringService
from coordinator.monitoring.tiers import (
    GRID_RES,
    MonitoringConfigError,
    Tier,
    parse_tiers,
    pick_resolution,
    rows_per_worker,
)
from coordinator.store import Store
from coordinator.store.metrics import WORKER_COLUMNS

T0 = 1_700_000_000.0 // 3600 * 3600  # a whole hour, so buckets line up with the test's
TIERS = [Tier(60, 3600), Tier(600, 6 * 3600), Tier(3600, 86400)]


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/metrics.db"
    else:
        url = request.getfixturevalue("fresh_mariadb_url")
    with Store.open(url) as opened:
        yield opened


def add_workers(store: Store, count: int, now: float = T0) -> list[str]:
    wids = [f"w{i:03d}" for i in range(count)]
    for wid in wids:
        store.upsert_worker_caps(wid, {"wid": wid, "name": wid, "slots": 2}, now)
    return wids


def write_samples(store: Store, rows: list[tuple[Any, ...]]) -> None:
    """Raw heartbeat rows ``(wid, ts, cpu, load1, mem, disk, sent, recv, running)``, written
    straight into the sample table as the heartbeat writer would (one executemany)."""
    columns = ("worker_id", "ts", "cpu_percent", "load1", "mem_used_bytes", "disk_free_bytes",
               "net_sent_bytes", "net_recv_bytes", "running")
    quote = store.db.quote
    names = ", ".join(f"{quote[0]}{c}{quote[1]}" for c in columns)
    table = f"{quote[0]}xc_worker_sample{quote[1]}"
    sql = f"INSERT INTO {table} ({names}) VALUES ({', '.join([store.db.param] * len(columns))})"
    with store.db.connection_context(), store.db.atomic():
        cursor = store.db.cursor()
        cursor.executemany(sql, rows)
        cursor.close()


def buckets(store: Store, res: int, wid: str | None = None) -> list[dict[str, Any]]:
    metric = store.models.WorkerMetric
    with store.db.connection_context():
        query = metric.select().where(metric.res == res).order_by(metric.worker_id, metric.ts)
        if wid is not None:
            query = query.where(metric.worker_id == wid)
        return cast(list[dict[str, Any]], list(query.dicts()))


def count(store: Store, model: Any) -> int:
    with store.db.connection_context():
        return int(model.select().count())


def rollup(store: Store, **kwargs: Any) -> Rollup:
    return Rollup(store, raw_retention_s=kwargs.pop("raw_retention_s", 600), tiers=TIERS,
                  settle_s=kwargs.pop("settle_s", 5.0), **kwargs)


# --------------------------------------------------------------------------- tiers


def test_tiers_parse_and_refuse_what_cannot_roll_up() -> None:
    assert parse_tiers(["1m:1d", "15m:8d", "1h:35d"]) == [
        Tier(60, 86400), Tier(900, 8 * 86400), Tier(3600, 35 * 86400)]
    for bad in (["7m:1d", "10m:2d"], ["1m:1d", "1m:2d"], ["1m"], ["15s:1d"], ["1m:10s"],
                ["x:1d"], []):
        with pytest.raises(MonitoringConfigError):
            parse_tiers(bad)


def test_pick_resolution_draws_a_range_from_the_finest_tier_that_holds_it() -> None:
    tiers = parse_tiers(["1m:1d", "15m:8d", "1h:35d"])
    assert pick_resolution(900, 3600, tiers) == 0
    assert pick_resolution(6 * 3600, 3600, tiers) == 60
    assert pick_resolution(7 * 86400, 3600, tiers) == 900
    assert pick_resolution(30 * 86400, 3600, tiers) == 3600
    assert pick_resolution(400 * 86400, 3600, tiers) == 3600


# --------------------------------------------------------------------------- folding


def test_samples_fold_into_minute_buckets_with_min_avg_max_and_rates(store: Store) -> None:
    add_workers(store, 2)
    rows: list[tuple[Any, ...]] = []
    for i in range(24):  # 5 s heartbeats: two minutes
        ts = T0 + 5 * i
        rows.append(("w000", ts, float(i), 1.0, 1000 + i, 500, 100 * i, 1000 * i, i % 3))
        rows.append(("w001", ts, 50.0, None, 2000, None, None, None, 0))
    write_samples(store, rows)
    report = rollup(store).run(T0 + 120)
    assert report.samples == 48
    first, second = buckets(store, 60, "w000")
    assert (first["ts"], first["n"], second["ts"], second["n"]) == (T0, 12, T0 + 60, 12)
    assert (first["cpu_min"], first["cpu_max"]) == (0.0, 11.0)
    assert first["cpu_sum"] / first["n"] == pytest.approx(5.5)
    assert first["mem_min"] == 1000
    assert second["mem_max"] == 1023
    assert first["load_n"] == 12
    assert first["run_max"] == 2
    # Rates from consecutive counters: 1000 B / 5 s received, 100 B / 5 s sent.
    assert first["net_n"] == 11  # the very first sample has no predecessor
    assert first["rx_sum"] / first["net_n"] == pytest.approx(200.0)
    assert second["tx_max"] == pytest.approx(20.0)
    other = buckets(store, 60, "w001")
    assert [b["load_n"] for b in other] == [0, 0]
    assert [b["net_n"] for b in other] == [0, 0]
    assert other[0]["disk_min"] is None


def test_an_open_bucket_takes_more_samples_on_the_next_pass(store: Store) -> None:
    add_workers(store, 1)
    roller = rollup(store)
    write_samples(store, [("w000", T0 + i, 10.0 + i, None, 1, None, None, None, 0)
                          for i in range(3)])
    roller.run(T0 + 3)
    write_samples(store, [("w000", T0 + 30 + i, 90.0 - i, None, 1, None, None, None, 0)
                          for i in range(2)])
    roller.run(T0 + 35)
    (bucket,) = buckets(store, 60)
    assert (bucket["n"], bucket["cpu_min"], bucket["cpu_max"]) == (5, 10.0, 90.0)
    assert bucket["cpu_sum"] == pytest.approx(10 + 11 + 12 + 90 + 89)


def test_coarser_tiers_fold_complete_buckets_once(store: Store) -> None:
    add_workers(store, 3)
    rows = [(wid, T0 + t, float(t % 100), 0.5, 10, 10, 0, 0, 0)
            for t in range(0, 3 * 3600, 10) for wid in ("w000", "w001", "w002")]
    write_samples(store, rows)
    roller = rollup(store)
    roller.run(T0 + 3 * 3600 + 60)
    roller.run(T0 + 3 * 3600 + 120)  # nothing new: nothing folds twice
    tens = buckets(store, 600, "w001")
    assert len(tens) == 18  # 3 hours of complete 10-minute buckets
    assert all(b["n"] == 60 for b in tens)
    hours = buckets(store, 3600, "w002")
    assert [b["ts"] for b in hours] == [T0, T0 + 3600, T0 + 7200]
    assert all(b["n"] == 360 for b in hours)
    assert hours[0]["cpu_min"] == 0.0
    assert hours[0]["cpu_max"] == 90.0
    assert sum(b["n"] for b in buckets(store, 600)) == len(rows)  # minutes: 1 h kept


def test_two_rollups_on_one_database_never_count_a_sample_twice(store: Store) -> None:
    add_workers(store, 1)
    first, second = rollup(store, batch=7), rollup(store, batch=7)
    write_samples(store, [("w000", T0 + i, 1.0, None, 1, None, None, None, 0)
                          for i in range(40)])
    for step in range(8):
        (first if step % 2 else second).run(T0 + 41)
    assert sum(b["n"] for b in buckets(store, 60)) == 40
    assert store.metric_cursor(RAW_CURSOR) == pytest.approx(store.max_raw_id())


def test_gpu_use_comes_from_the_latest_heartbeat(store: Store) -> None:
    add_workers(store, 2)
    gpus = [{"index": 0, "util_percent": 30.0, "memory_used_bytes": 1000},
            {"index": 1, "util_percent": 70.0, "memory_used_bytes": 3000}]
    store.record_heartbeats([("w000", {"wid": "w000", "seq": 1, "interval_s": 5.0,
                                       "cpu_percent": 5.0, "mem_used_bytes": 1,
                                       "free_slots": 1, "gpus": gpus}, T0 + 1),
                             ("w001", {"wid": "w001", "seq": 1, "interval_s": 5.0,
                                       "cpu_percent": 5.0, "mem_used_bytes": 1,
                                       "free_slots": 1}, T0 + 1)])
    rollup(store).run(T0 + 2)
    (bucket,) = buckets(store, 60, "w000")
    assert (bucket["gpu_n"], bucket["gpu_sum"], bucket["gpu_mem_max"]) == (1, 50.0, 4000)
    (plain,) = buckets(store, 60, "w001")
    assert plain["gpu_n"] == 0
    assert gpu_usage({"gpus": "nonsense"}) == (None, None)
    assert gpu_usage({"gpus": [{"index": 0, "util_percent": float("nan")}]}) == (None, None)


def test_a_first_pass_skips_samples_older_than_every_tier(store: Store) -> None:
    add_workers(store, 1)
    old = [("w000", T0 - 2 * 86400 + i, 1.0, None, 1, None, None, None, 0) for i in range(5)]
    new = [("w000", T0 + i, 2.0, None, 1, None, None, None, 0) for i in range(5)]
    write_samples(store, old + new)
    report = rollup(store).run(T0 + 10)
    assert report.samples == 5
    assert report.deleted["raw"] == 5
    assert [b["ts"] for b in buckets(store, 60)] == [T0]


# --------------------------------------------------------------------------- the bound


def test_days_of_heartbeats_from_many_workers_stay_bounded(store: Store) -> None:
    """12 simulated hours, 20 workers, 60 s heartbeats, a pass every 10 minutes;
    retentions scaled down (raw 10 min, 1 min for 1 h, 10 min for 3 h, 1 h for 6 h) so the
    second half is past the longest one. Every table stops growing at the size retention
    allows. (It simulated 2 days with a 1-day tier until 2026-11-28: 21 s on MariaDB.)"""
    workers, heartbeat, step = 20, 60, 600
    longest = 6 * 3600
    config = MonitoringConfig(raw_retention_s=600, tiers=["1m:1h", "10m:3h", "1h:6h"])
    wids = add_workers(store, workers)
    service = MonitoringService(config, store, heartbeats_total=lambda: 0, clock=lambda: T0)
    sizes: list[tuple[float, int, int, int]] = []
    counters = dict.fromkeys(wids, 0)
    for now in range(int(T0) + step, int(T0) + 2 * longest + 1, step):
        rows = []
        for ts in range(now - step, now, heartbeat):
            for wid in wids:
                counters[wid] += 4096
                rows.append((wid, float(ts), 42.0, 0.5, 10**9, 10**10, counters[wid],
                             2 * counters[wid], 1))
        write_samples(store, rows)
        service.run_pass(float(now))
        if (now - T0) % 3600 == 0:
            sizes.append((now - T0, count(store, store.models.WorkerSample),
                          count(store, store.models.WorkerMetric),
                          count(store, store.models.GridMetric)))
    bound_per_worker = rows_per_worker(config.raw_retention_s, heartbeat, service.tiers)
    # Open buckets and those waiting for the next tier's fold: one pass's worth each.
    slack = (step // heartbeat) + sum(step // t.res + 2 for t in service.tiers)
    day_one = [s for s in sizes if s[0] >= longest]
    for _, raw, worker_rows, grid_rows in day_one:
        assert raw + worker_rows <= workers * (bound_per_worker + slack), sizes[-1]
        assert grid_rows <= 20 * (config.raw_retention_s // GRID_RES + bound_per_worker)
    # Past the longest retention, the tables no longer grow.
    assert max(s[2] for s in day_one) - min(s[2] for s in day_one) <= workers * slack
    assert max(s[1] for s in day_one) <= workers * (config.raw_retention_s // heartbeat + 1
                                                     + step // heartbeat)
    # And what is kept is right: the last complete hour holds every sample of it.
    hours = buckets(store, 3600, "w017")
    assert hours[-1]["n"] == 3600 // heartbeat
    assert hours[-1]["rx_sum"] / hours[-1]["net_n"] == pytest.approx(2 * 4096 / heartbeat)
    assert len(hours) <= longest // 3600 + 2
    # The grid-wide series were rolled up the same way.
    grid = store.grid_buckets(3600, T0, T0 + 3 * 86400, ["workers_online"], 1000)
    assert grid
    assert grid[-1][3] == 3600 // step  # one snapshot per pass
    assert grid[-1][4] / grid[-1][3] == pytest.approx(workers)


def test_worker_columns_match_the_model() -> None:
    from coordinator.models import WorkerMetric

    assert set(WORKER_COLUMNS) == {f.column_name for f in WorkerMetric._meta.sorted_fields}
