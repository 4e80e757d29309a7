"""Replicated jobs (issue 11, item 7b): jobs/s with ``replicas 2 / quorum 2`` beside
``replicas 1``, in one run on one grid.

The grid is bench/jobs.py's Mosquitto grid (``xcloud coordinator`` and two ``xcloud
worker --slots 2`` as separate processes, SQLite). N ``true`` jobs (1,000; 200 with
``--quick``) are submitted in requests of 500 and timed from the first submit to the
last terminal ``job.event`` (a listing per batch every 2 s backs up missed events),
first unreplicated, then with ``replicas: 2, quorum: 2`` (each job runs on both workers
and completes when their results agree), then unreplicated again (the machine may have
drifted: both unreplicated runs are reported). A replicated job costs two attempts, so
half the unreplicated rate is the ceiling; coordinator CPU per job and per attempt say
what the quorum itself costs.

    python -m bench.job_replicas [--quick]
"""

from __future__ import annotations

from typing import Any

from bench.job_grids import WORKERS, EventLog, SplitGrid2, wait_workers
from bench.jobs import throughput
from bench.machine import machine_line
from bench.report import cli, fmt, md_table
from bench.scratch import scratch_dir

FULL = {"jobs": 1000}
QUICK = {"jobs": 200}
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("replicas 1", {}), ("replicas 2 / quorum 2", {"replicas": 2, "quorum": 2}),
    ("replicas 1 (again)", {}))


def timed(grid: Any, events: EventLog, n: int, coord_pid: int, extra: dict[str, Any],
          tag: str) -> dict[str, Any]:
    """bench/jobs.py's ``throughput`` with ``extra`` spec fields, plus per-attempt rates."""
    row = throughput(grid, events, n, coord_pid, extra=extra, tag=tag)
    attempts = n * int(extra.get("replicas", 1))
    cpu_ms = row["coordinator_cpu_ms_per_job"] * n
    return {**row, "attempts_per_s": attempts / row["seconds"],
            "coordinator_cpu_ms_per_attempt": cpu_ms / attempts}


def run(quick: bool = False) -> dict[str, Any]:
    from client.api import Grid

    n = (QUICK if quick else FULL)["jobs"]
    result: dict[str, Any] = {"jobs": n, "quick": quick, "runs": {}}
    with scratch_dir("xcloud-bench-replicas-") as tmp:
        xgrid = SplitGrid2(tmp)
        try:
            with xgrid, Grid.connect(xgrid.config) as grid:
                events = EventLog()
                events.hook(grid)
                wait_workers(grid, WORKERS)
                timed(grid, events, 50, xgrid.coordinator_pid(), {}, "warm")
                for index, (label, extra) in enumerate(VARIANTS):
                    result["runs"][label] = timed(grid, events, n, xgrid.coordinator_pid(),
                                                  extra, f"r{index}-")
        except Exception as err:
            result["error"] = f"{type(err).__name__}: {err}"
            result["diagnostics"] = xgrid.diagnostics()[-4000:]
    return result


def markdown(result: dict[str, Any]) -> str:
    n = result["jobs"]
    lines = [f"### Replicated jobs: {n:,} × `true`, 2 workers × 2 slots (Mosquitto, SQLite)",
             ""]
    if "machine" in result:
        lines += [f"Machine: {machine_line(result['machine'])}", ""]
    runs = result.get("runs", {})
    base = runs.get("replicas 1", {}).get("jobs_per_s")
    rows = [[label, fmt(r["jobs_per_s"]), fmt(r["attempts_per_s"]), fmt(r["seconds"], 2),
             f"{r['completed']}/{r['n']}", fmt(r["coordinator_cpu_ms_per_job"], 2),
             fmt(r["coordinator_cpu_ms_per_attempt"], 2),
             f"{r['jobs_per_s'] / base:.2f}×" if base else "–"]
            for label, r in runs.items()]
    lines += [md_table(["run", "jobs/s", "attempts/s", "seconds", "completed",
                        "coord CPU ms/job", "ms/attempt", "÷ replicas 1"], rows), ""]
    if "error" in result:
        lines += [f"- error: {result['error']}"]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    return cli("job_replicas", (__doc__ or "job_replicas").split("\n\n")[0], run, markdown,
               None, argv)


if __name__ == "__main__":
    raise SystemExit(main())
