"""Scheduler pass time with a big queue (issue 11, item 7a): 100,000 queued jobs from 100
principals and 1,000 simulated workers (4 slots each), fair share on and off.

    python -m bench.scheduler_pass [--quick] [--json PATH] [--db sqlite,mariadb]

The store is filled directly (jobs inserted in bulk, workers as records with caps), then
``JobScheduler.run_pass`` is timed on it with no bus (assignments are committed; their
``job.assign`` goes nowhere): every slot is made busy (in bulk; ``--fill``: by one
timed *fill* pass, every slot free: 4,000 placements over 1,000 workers, ~20 s),
then *steady* passes, each after 40 running attempts ended (as a grid in its stride sees:
a few slots free, the queue deep), and *idle* passes (no slot free), first with ``[jobs]
fair_share`` off (one walk of the queue head, as before fair share), then on (per-owner
heads, coordinator/fair_share.py), on the same database. ``QuietBus`` is that missing
bus; bench/jobs.py's pass over a queue and tests/test_fair_share.py use it too.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any, cast

from bench.databases import database, mariadb_available
from bench.machine import machine_line
from bench.percentiles import latency_ms
from bench.report import fmt, md_table
from bench.scratch import scratch_dir

FULL = {"jobs": 100_000, "owners": 100, "workers": 1000, "slots": 4, "passes": 30,
        "free_per_pass": 40}
QUICK = {"jobs": 10_000, "owners": 20, "workers": 100, "slots": 4, "passes": 10,
         "free_per_pass": 8}


class QuietBus:
    """Stands in for the bus in an offline scheduler pass: events and assignments go
    nowhere (the pass's decisions are in the store)."""

    def send(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def publish(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def publish_bytes(self, *_args: Any, **_kwargs: Any) -> None:  # job events
        return None


def _caps(wid: str, slots: int) -> dict[str, Any]:
    return {
        "wid": wid, "name": wid, "description": "", "tags": ["linux"], "slots": slots,
        "executors": ["process"],
        "host": {"hostname": wid, "os": "Linux", "os_release": "6.1", "arch": "x86_64"},
        "cpu": {"count": slots, "physical": slots, "model": "x", "freq_mhz": 2000.0},
        "memory_bytes": slots * 2**30, "disk_total_bytes": 10**12, "disk_free_bytes": 10**11,
        "docker": {"available": False, "version": None, "images": []},
        "shared": {"apps": [], "packages": [], "data": []}, "agent_version": "0.1.0"}


def _fill(store: Any, sizes: dict[str, int]) -> dict[str, float]:
    """Workers as records, jobs inserted in bulk: round-robin owners, three priorities."""
    t0 = time.monotonic()
    now = time.time()
    for i in range(sizes["workers"]):
        store.upsert_worker_caps(f"w-{i:04d}", _caps(f"w-{i:04d}", sizes["slots"]), now)
    workers_s = time.monotonic() - t0
    t0 = time.monotonic()
    job = store.models.Job
    rows = [{"id": f"j-{i:016x}", "batch": "b-bench", "owner": f"p-{i % sizes['owners']:03d}",
             "name": "", "state": "queued", "rank": -(i % 3), "submitted_at": now + i * 1e-4,
             "spec": '{"command":"true"}', "updated_at": now, "cpus": 1, "memory_bytes": 0}
            for i in range(sizes["jobs"])]
    with store.db.connection_context(), store.db.atomic():
        for start in range(0, len(rows), 1000):
            job.insert_many(rows[start:start + 1000]).execute()
    return {"workers_s": round(workers_s, 2), "jobs_s": round(time.monotonic() - t0, 2)}


def _end_attempts(store: Any, count: int | None, rng: random.Random) -> int:
    """End ``count`` random live attempts (all: None), their jobs completed (bulk SQL:
    the setup of a pass, not what is measured)."""
    db = store.db
    q = db.param
    with db.connection_context(), db.atomic():
        live = [r[0] for r in db.execute_sql(
            f"SELECT id FROM xc_attempt WHERE live = {q}", (True,)).fetchall()]
        chosen = live if count is None else rng.sample(live, min(count, len(live)))
        for start in range(0, len(chosen), 500):
            part = chosen[start:start + 500]
            marks = ", ".join([q] * len(part))
            db.execute_sql(f"UPDATE xc_job SET state = 'completed', ended_at = {q} "
                           f"WHERE current_attempt IN ({marks})", (time.time(), *part))
            db.execute_sql(f"UPDATE xc_attempt SET live = {q}, kind = 'success' "
                           f"WHERE id IN ({marks})", (False, *part))
    return len(chosen)


def _scheduler(store: Any, fair: bool) -> Any:
    from broker.config import JobsConfig
    from coordinator.scheduler import JobScheduler
    from schemas.topics import Topics

    return JobScheduler(cast(Any, QuietBus()), store, cast(Any, None),
                        JobsConfig(fair_share=fair), Topics("bench"))


def _occupy(store: Any, sizes: dict[str, int]) -> float:
    """Every slot busy, written in bulk: the first jobs (round-robin owners, so each
    holds the same number of slots) running on the workers in turn."""
    t0 = time.monotonic()
    now = time.time()
    n = sizes["workers"] * sizes["slots"]
    attempt, job = store.models.Attempt, store.models.Job
    rows = [{"id": f"a-{i:016x}", "job_id": f"j-{i:016x}",
             "worker_id": f"w-{i % sizes['workers']:04d}", "owner": f"p-{i % sizes['owners']:03d}",
             "kind": "running", "live": True, "assigned_at": now, "acked_at": now,
             "started_at": now, "cpus": 1, "memory_bytes": 0, "missing": 0} for i in range(n)]
    with store.db.connection_context(), store.db.atomic():
        for start in range(0, n, 1000):
            attempt.insert_many(rows[start:start + 1000]).execute()
        for r in rows:
            job.update(state="running", current_attempt=r["id"], worker=r["worker_id"],
                       started_at=now).where(job.id == r["job_id"]).execute()
    return round(time.monotonic() - t0, 2)


def _fill_pass(store: Any) -> dict[str, Any]:
    """Every slot free: one pass assigns a job to each (fair share on; the cost is the
    placement, the same for both orders)."""
    sched = _scheduler(store, True)
    t0 = time.monotonic()
    filled = sched.run_pass()
    elapsed = time.monotonic() - t0
    db = store.db  # the workers' acknowledgements (else the ack deadline requeues them)
    with db.connection_context(), db.atomic():
        db.execute_sql(f"UPDATE xc_attempt SET acked_at = {db.param}, kind = 'running' "
                       f"WHERE live = {db.param}", (time.time(), True))
    return {"fill_pass_ms": round(elapsed * 1000, 1), "fill_assigned": filled}


def _variant(store: Any, sizes: dict[str, int], fair: bool) -> dict[str, Any]:
    """Steady passes (a few slots freed before each) and idle ones (none free)."""
    rng = random.Random(11)
    sched = _scheduler(store, fair)
    steady: list[float] = []
    assigned: list[int] = []
    for _ in range(sizes["passes"]):
        _end_attempts(store, sizes["free_per_pass"], rng)
        t0 = time.monotonic()
        assigned.append(sched.run_pass())
        steady.append(time.monotonic() - t0)
    idle: list[float] = []
    for _ in range(sizes["passes"]):
        t0 = time.monotonic()
        sched.run_pass()
        idle.append(time.monotonic() - t0)
    held = store.live_attempts_by_owner()
    t0 = time.monotonic()
    owners = store.queued_owners()
    owners_s = time.monotonic() - t0
    return {"steady_ms": latency_ms(steady),
            "steady_assigned_p50": sorted(assigned)[len(assigned) // 2],
            "idle_ms": latency_ms(idle),
            "owners_read_ms": round(owners_s * 1000, 2), "owners_queued": len(owners),
            "slots_per_owner_min": min(held.values(), default=0),
            "slots_per_owner_max": max(held.values(), default=0)}


def run(quick: bool = False, db: str = "sqlite,mariadb", fill: bool = False
        ) -> dict[str, Any]:
    from coordinator.store import Store

    sizes = QUICK if quick else FULL
    result: dict[str, Any] = {"sizes": sizes, "quick": quick, "dbs": {}}
    kinds = [k.strip() for k in db.split(",") if k.strip()]
    with scratch_dir("xcloud-bench-sched-") as tmp:
        for kind in kinds:
            if kind == "mariadb" and not mariadb_available():
                result["dbs"][kind] = {"error": "no MariaDB server answers"}
                continue
            with database(kind, tmp) as url:
                store = Store.open(url)
                try:
                    row: dict[str, Any] = {"setup": _fill(store, sizes)}
                    print(f"scheduler_pass: {kind}: filled {row['setup']}", file=sys.stderr,
                          flush=True)
                    if fill:
                        row["fill"] = _fill_pass(store)
                    else:
                        row["setup"]["occupy_s"] = _occupy(store, sizes)
                    print(f"scheduler_pass: {kind}: slots busy {row}", file=sys.stderr,
                          flush=True)
                    row["head"] = _variant(store, sizes, fair=False)
                    print(f"scheduler_pass: {kind}: {row['head']}", file=sys.stderr,
                          flush=True)
                    row["fair"] = _variant(store, sizes, fair=True)
                    print(f"scheduler_pass: {kind}: {row['fair']}", file=sys.stderr,
                          flush=True)
                finally:
                    store.close()
            result["dbs"][kind] = row
    return result


def markdown(result: dict[str, Any]) -> str:
    s = result["sizes"]
    lines = [f"### Scheduler pass: {s['jobs']:,} queued jobs from {s['owners']} principals, "
             f"{s['workers']:,} workers × {s['slots']} slots", ""]
    if "machine" in result:
        lines += [f"Machine: {machine_line(result['machine'])}", ""]
    rows = []
    for kind, row in result["dbs"].items():
        if "error" in row:
            lines.append(f"- {kind}: {row['error']}")
            continue
        for name, label in (("head", "fair share off (one queue walk)"),
                            ("fair", "fair share on (per-owner heads)")):
            v = row[name]
            rows.append([kind, label, fmt(v["steady_ms"]["p50"], 1),
                         fmt(v["steady_ms"]["p90"], 1), str(v["steady_assigned_p50"]),
                         fmt(v["idle_ms"]["p50"], 1),
                         f"{v['slots_per_owner_min']}–{v['slots_per_owner_max']}"])
    lines += [md_table(["db", "pass", f"steady p50 ms ({s['free_per_pass']} slots free)",
                        "p90", "assigned", "idle p50 ms", "slots per owner after"], rows),
              ""]
    for kind, row in result["dbs"].items():
        if "error" not in row:
            f = row["fair"]
            if "fill" in row:
                lines.append(f"{kind}: the fill pass (every slot free) assigned "
                             f"{row['fill']['fill_assigned']} jobs in "
                             f"{fmt(row['fill']['fill_pass_ms'])} ms.")
            lines.append(f"{kind}: setup {row['setup']['jobs_s']} s for the jobs, "
                         f"{row['setup']['workers_s']} s for the workers; the owners with "
                         f"queued work read in {fmt(f['owners_read_ms'], 2)} ms "
                         f"({f['owners_queued']} owners).")
    return "\n".join(lines).rstrip() + "\n"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default="sqlite,mariadb", help="sqlite, mariadb or both")
    parser.add_argument("--fill", action="store_true",
                        help="fill the slots with a timed pass (every slot free: ~20 s "
                        "with 1,000 workers) instead of in bulk")


def main(argv: list[str] | None = None) -> int:
    from bench.report import cli

    return cli("scheduler_pass", (__doc__ or "").split("\n\n")[0], run, markdown, add_args,
               argv)


if __name__ == "__main__":
    raise SystemExit(main())
