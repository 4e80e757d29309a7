"""Batch jobs: xcloud beside Celery (Redis, RabbitMQ) and Dask, side by side in one run.

Every system runs N jobs (2,000; 200 with ``--quick``) whose work is the ``true``
command, on 4 slots in all, and is timed from the first submit to the last result:

- **xcloud**, as real separate processes, through Mosquitto (``xcloud coordinator`` and
  two ``xcloud worker --slots 2`` beside a Mosquitto with the password and ACL files of
  ``broker.mosquitto``) and through the embedded broker (``xcloud up --workers 2`` with
  ``XCLOUD_WORKER_SLOTS=2``: amqtt and the coordinator in one process, the workers its
  children); process executor. The client sends ``jobs.submit`` requests of 500 specs
  (``command: true``) and the run ends when every job's terminal event came back (in a
  ``job.events``: the client accepts several per message)
  (a listing per batch every 2 s backs up any missed event). Coordinator CPU per job is
  that process's CPU time (psutil) over the run divided by N (with ``xcloud up`` it
  includes the embedded broker).
- **the coordinator's ceiling** (``xcloud-instant``: a measure beside the targets, not
  one of them): the Mosquitto grid with two ``bench.instant_workers`` in place of the
  workers; each answers ``job.assign`` ok and reports success at once, running nothing.
  Its jobs/s is the most this coordinator (and broker and client) can give on the
  machine however cheap the workers become.
- **submit → running** on the idle pool: 50 single jobs one after another, from the
  client's call to the ``job.event`` "running" (the attempt is committed and
  ``job.assign`` is on its way), and to the attempt's ``started_at`` (the worker's clock
  when the command ran; same machine).
- **100,000 queued**: on the Mosquitto grid, 100,000 low-priority jobs (priority -10,
  another owner) are written straight into the coordinator's SQLite database, then the
  N jobs (priority 0) are timed again; afterwards the coordinator is stopped and one
  scheduler pass (``JobScheduler.run_pass`` on that database, workers still online in
  it, assignments not sent) is timed with free slots and without.
- **Celery 5** with Redis (127.0.0.1:6379, every key under a random prefix, removed
  afterwards) and with RabbitMQ (amqp://guest@127.0.0.1:5672//, a queue of its own,
  deleted afterwards, result backend ``rpc://``): two worker processes with
  ``--concurrency 2`` (prefork), no gossip, mingle or heartbeat; the task runs
  ``subprocess.run(["true"])``; ``.delay`` N times, then ``.get()`` of every result.
- **Dask** ``LocalCluster(n_workers=2, threads_per_worker=2, processes=True)``,
  ``client.map`` of the same subprocess, then ``gather``.

Nothing is asserted: the targets (jobs/s ≥ 1.0× Celery and Dask in the same run on both
brokers, submit → running p50 ≤ 10 ms, no collapse with 100,000 queued) are reported as
met or missed.

``--rounds R`` runs every variant R times, interleaved (every other round in reversed
order), and adds each ratio per round and its median: the machine's speed drifts, and a
ratio from one sequential pass carries that drift. Every run is warmed up first: Celery
and Dask with 20 tasks, an xcloud grid with its latency jobs or (a later round's fresh
grid) 20 jobs.

    python -m bench.jobs [--quick] [--rounds R] [--only xcloud-mosquitto,xcloud-up,...]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any, cast

import psutil

from bench.cpu_load import LoadMonitor, machine_busy_s
from bench.job_grids import TERMINAL, WORKERS, EventLog, SplitGrid2, UpGrid2, wait_workers
from bench.job_peers import run_celery, run_dask
from bench.machine import machine_line
from bench.percentiles import latency_ms
from bench.report import cli, fmt, md_table, ratio
from bench.scheduler_pass import QuietBus
from bench.scratch import scratch_dir

VARIANTS = ("xcloud-mosquitto", "xcloud-prefetch", "xcloud-up", "xcloud-up-thread",
            "xcloud-instant", "xcloud-results", "celery-redis", "celery-rabbitmq", "dask")
# xcloud-results: jobs that print a line and write one small file, kept as the owner's data
# (they ride in the report: docs/jobs.md, "Small results")
RESULTS_SPEC = {"command": "echo $XCLOUD_JOB_ID > out.txt; echo done", "outputs": ["out.txt"]}
FULL = {"jobs": 2000, "latency": 50}
QUICK = {"jobs": 200, "latency": 50}
BATCH = 500
WARMUP = 20  # jobs each system runs before it is timed (job_peers.py: the same)
QUEUED = 100_000
REDIS_URL = os.environ.get("XCLOUD_BENCH_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("XCLOUD_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
RUN_TIMEOUT_S = 600.0


# ----------------------------------------------------------------------------- xcloud runs


def submit(grid: Any, specs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """``jobs.submit`` in requests of BATCH specs: (job ids, batch ids)."""
    from schemas.job_messages import JobsSubmit

    ids: list[str] = []
    batches: list[str] = []
    for start in range(0, len(specs), BATCH):
        reply = grid.ask(JobsSubmit(jobs=specs[start:start + BATCH]), what="submit jobs")
        ids += list(reply.ids)
        batches.append(str(reply.batch))
    return ids, batches


def throughput(grid: Any, events: EventLog, n: int, coord_pid: int, priority: int = 0,
               extra: dict[str, Any] | None = None, tag: str = "t") -> dict[str, Any]:
    """N ``true`` jobs (with ``extra`` spec fields), first submit to last terminal event;
    coordinator CPU per job."""
    coord = psutil.Process(coord_pid)
    cpu0 = sum(coord.cpu_times()[:2])
    roles = CpuByRole(coord_pid)
    specs = [{"command": "true", "priority": priority, "name": f"{tag}{i}", **(extra or {})}
             for i in range(n)]
    started = time.monotonic()
    ids, batches = submit(grid, specs)
    submitted = time.monotonic() - started
    wanted = set(ids)
    polled: dict[str, float] = {}  # job -> when a listing first showed it ended
    states: dict[str, str] = {}
    deadline = started + RUN_TIMEOUT_S
    progress = -1
    while True:
        with events.cond:
            events.cond.wait_for(lambda: wanted <= events.ended, 2.0)
            missing = wanted - events.ended - polled.keys()
            ended = len(events.ended)
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(missing)} of {n} jobs not ended in {RUN_TIMEOUT_S:g} s")
        if ended != progress:  # events still coming: listing now would only load the grid
            progress = ended
            continue
        for batch in batches:  # backstop for a missed event, once they stopped coming
            listing = grid.jobs.ls(batch=batch)
            now = time.monotonic()
            for job in listing:
                if job["state"] in TERMINAL and job["id"] in missing:
                    polled[str(job["id"])] = now
                    states[str(job["id"])] = str(job["state"])
    with events.cond:
        seen = {j: min(events.seen.get((j, s), math.inf) for s in TERMINAL) for j in wanted}
    # each job ended when its terminal event came or a listing showed it, whichever first
    last = max(min(seen[j], polled.get(j, math.inf)) for j in wanted)
    elapsed = last - started
    cpu = sum(coord.cpu_times()[:2]) - cpu0
    by_role = roles.per_job_ms(n)
    completed = sum(1 for j in ids if (j, "completed") in events.seen
                    or states.get(j) == "completed")
    return {"n": n, "seconds": elapsed, "jobs_per_s": n / elapsed, "submit_s": submitted,
            "completed": completed, "events_missing": sum(1 for j in wanted
                                                          if seen[j] == math.inf),
            "coordinator_cpu_ms_per_job": cpu * 1000.0 / n, "cpu_ms_per_job": by_role}


class CpuByRole:
    """CPU per job of each part of a grid over a run: the coordinator, the broker, the
    workers with the commands they ran (their reaped children), this client, and the
    whole machine busy (all of it, others included): is the run CPU-bound?

    The grid's processes are found from the coordinator's parent: the bench spawned them
    all (split grid) or ``xcloud up`` did (its children)."""

    def __init__(self, coord_pid: int) -> None:
        self.procs: dict[str, list[psutil.Process]] = {}
        me = psutil.Process()
        for proc in me.children(recursive=True):
            try:
                argv = proc.cmdline()
            except psutil.Error:
                continue
            command = (argv[argv.index("client.cli") + 1] if "client.cli" in argv[:-1] else
                       "worker" if "bench.instant_workers" in argv else "")
            role = ("broker" if argv and os.path.basename(argv[0]).startswith("mosquitto")
                    else "up" if command == "up" and proc.pid == coord_pid
                    else {"coordinator": "coordinator", "broker": "broker",
                          "worker": "workers"}.get(command, ""))
            if role:
                self.procs.setdefault(role, []).append(proc)
        self.procs["client"] = [me]
        self.before = {role: self._cpu(ps) for role, ps in self.procs.items()}
        self.machine0 = machine_busy_s()

    @staticmethod
    def _cpu(procs: list[psutil.Process]) -> float:
        total = 0.0
        for proc in procs:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def per_job_ms(self, n: int) -> dict[str, float]:
        out = {role: (self._cpu(ps) - self.before[role]) * 1000.0 / n
               for role, ps in self.procs.items()}
        out["machine"] = (machine_busy_s() - self.machine0) * 1000.0 / n
        return out


def submit_latency(grid: Any, events: EventLog, runs: int) -> dict[str, Any]:
    """Single jobs on the idle pool: to job.event running, and to the command's start."""
    to_running: list[float] = []
    to_started: list[float] = []
    for i in range(runs + 3):  # 3 warm-up jobs
        wall0 = time.time()
        t0 = time.monotonic()
        (job,), _ = submit(grid, [{"command": "true", "name": f"lat{i}"}])
        running = events.wait((job, "running"), 30.0)
        with events.cond:
            events.cond.wait_for(lambda j=job: j in events.ended, 30.0)  # type: ignore[misc]
        if i < 3:
            continue
        to_running.append(running - t0)
        attempts = grid.jobs.show(job).attempts or []
        started_at = attempts[-1].get("started_at") if attempts else None
        if started_at:
            to_started.append(float(started_at) - wall0)
    return {"to_running_ms": latency_ms(to_running), "to_started_ms": latency_ms(to_started)}


def fill_queue(db_file: Path, count: int) -> float:
    """``count`` queued low-priority jobs of the timing client itself, written straight into
    SQLite. Its own: with another owner's, fair share gives that owner half the slots, and
    the run measures fair share rather than the depth of the queue."""
    now = time.time()
    rows = [(f"j-bulk{i:011x}", 10, now + i * 1e-3) for i in range(count)]
    t0 = time.monotonic()
    conn = sqlite3.connect(db_file, timeout=60)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO xc_job (id, batch, owner, name, state, rank, submitted_at, spec, "
                "updated_at, cpus, memory_bytes, gpus, replicas, quorum, after, "
                "max_system_retries, max_retries, system_failures, job_failures, attempts) "
                "VALUES (?, 'b-bulk', 'bench-client', '', 'queued', ?, ?, "
                f"'{{\"command\":\"true\"}}', {now}, 1, 0, 0, 1, 1, '[]', 3, 0, 0, 0, 0)", rows)
    finally:
        conn.close()
    return time.monotonic() - t0




def scheduler_pass(db_file: Path, root: str, passes: int = 5) -> dict[str, Any]:
    """Time ``JobScheduler.run_pass`` on the grid's database (its coordinator stopped)."""
    from broker.config import JobsConfig
    from coordinator.job_state import AttemptKind
    from coordinator.scheduler import JobScheduler
    from coordinator.store import Store
    from schemas.topics import Topics

    with contextlib.closing(sqlite3.connect(db_file, timeout=60)) as conn, conn:
        states = dict(conn.execute("SELECT id, state FROM xc_worker").fetchall())
        conn.execute("UPDATE xc_worker SET state = 'online'")  # as while the grid ran
    store = Store.open(f"sqlite:///{db_file}")
    try:
        for attempt in store.live_attempts():  # free every slot (bulk jobs ran at the end)
            store.end_attempt(attempt.id, AttemptKind.WORKER_LOST, error="bench: freed",
                              now=time.time())
        sched = JobScheduler(cast(Any, QuietBus()), store, cast(Any, None), JobsConfig(),
                             Topics(root))
        with contextlib.closing(sqlite3.connect(db_file, timeout=60)) as conn:
            queued = conn.execute("SELECT COUNT(*) FROM xc_job WHERE state = 'queued'"
                                  ).fetchone()[0]
        t0 = time.monotonic()
        assigned = sched.run_pass()  # free slots: reads the head, commits attempts
        busy = time.monotonic() - t0
        idle: list[float] = []
        for _ in range(passes):  # no free slot left: nothing to read
            t0 = time.monotonic()
            sched.run_pass()
            idle.append(time.monotonic() - t0)
    finally:
        store.close()
    return {"queued": queued, "assigned": assigned, "worker_states_at_stop": states,
            "busy_pass_ms": busy * 1000.0, "idle_pass_ms": latency_ms(idle)["p50"]}


def run_xcloud(kind: str, workdir: Path, n: int, latency_runs: int,
               prefetch: int = 1, extras: bool = True) -> dict[str, Any]:
    """One grid's run; ``extras``: also the latency, and the 100,000-queued run and pass
    (Mosquitto), which a later round of ``--rounds`` leaves out."""
    from client.api import Grid

    xgrid: SplitGrid2 | UpGrid2 = (
        SplitGrid2(workdir) if kind in ("mosquitto", "results") else
        SplitGrid2(workdir, prefetch=prefetch) if kind == "prefetch" else
        SplitGrid2(workdir, instant=True) if kind == "instant" else
        UpGrid2(workdir, broker_thread=kind == "up-thread"))
    out: dict[str, Any] = {"label": xgrid.label}
    results = kind == "results"
    try:
        with xgrid:
            with Grid.connect(xgrid.config) as grid:
                events = EventLog()
                events.hook(grid)
                wait_workers(grid, WORKERS)
                if results or not extras:  # (the latency is the Mosquitto row's)
                    # warm-up, as Celery and Dask get (a grid with extras has run the
                    # latency jobs first): a later round's fresh grid otherwise timed its
                    # first jobs' one-time costs (cgroup tree, threads, caches)
                    throughput(grid, events, WARMUP, xgrid.coordinator_pid(), tag="warm")
                    out["run"] = throughput(grid, events, n, xgrid.coordinator_pid(),
                                            extra=RESULTS_SPEC if results else None)
                    return out
                out["latency"] = submit_latency(grid, events, latency_runs)
                out["run"] = throughput(grid, events, n, xgrid.coordinator_pid())
                if isinstance(xgrid, SplitGrid2) and not (xgrid.prefetch or xgrid.instant):
                    out["fill_s"] = fill_queue(xgrid.db_file, QUEUED)
                    out["queued_run"] = throughput(grid, events, n, xgrid.coordinator_pid())
            if isinstance(xgrid, SplitGrid2) and not (xgrid.prefetch or xgrid.instant):
                xgrid.stop_coordinator()
                out["pass"] = scheduler_pass(xgrid.db_file, xgrid.root)
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
        out["diagnostics"] = xgrid.diagnostics()[-4000:]
    return out


# ----------------------------------------------------------------------------- run / report


def run(quick: bool = False, only: str | None = None, prefetch: int = 1,
        rounds: int = 1) -> dict[str, Any]:
    """Every variant once (the full rows), then ``rounds - 1`` more rounds of their
    throughput alone, in reversed order every other round: the machine's speed drifts
    (±25 % here from one second to the next), and a ratio from one sequential run
    carries that drift; the median of the rounds' ratios less so."""
    sizes = QUICK if quick else FULL
    n = sizes["jobs"]
    names = [v.strip() for v in only.split(",")] if only else list(VARIANTS)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    result: dict[str, Any] = {"jobs": n, "quick": quick, "prefetch": prefetch,
                              "variants": {}, "rounds": []}
    with scratch_dir("xcloud-bench-jobs-") as tmp:
        for number in range(max(1, rounds)):
            order = names if number % 2 == 0 else names[::-1]
            rates: dict[str, float | None] = {}
            for name in order:
                t0 = time.monotonic()
                load = LoadMonitor().start()
                row = _variant(name, tmp, n, sizes["latency"], prefetch, extras=number == 0)
                row["elapsed_s"] = round(time.monotonic() - t0, 1)
                row["others_pct"] = round(load.stop()["others_pct"], 1)
                if number == 0:
                    result["variants"][name] = row
                rates[name] = _rate(row)
            result["rounds"].append(rates)
    return result


def _variant(name: str, tmp: Path, n: int, latency_runs: int, prefetch: int,
             extras: bool) -> dict[str, Any]:
    if name.startswith("xcloud-"):
        return run_xcloud(name.removeprefix("xcloud-"), tmp, n, latency_runs, prefetch,
                          extras=extras)
    if name == "celery-redis":
        return run_celery(REDIS_URL, REDIS_URL, n)
    if name == "celery-rabbitmq":
        return run_celery(AMQP_URL, "rpc://", n)
    return run_dask(n)


def _rate(row: dict[str, Any] | None) -> float | None:
    if not row or "error" in row:
        return None
    inner = row.get("run", row)
    value = inner.get("jobs_per_s")
    return float(value) if value else None


def markdown(result: dict[str, Any]) -> str:
    v = result["variants"]
    n = result["jobs"]
    lines = [f"### Batch jobs: {n:,} × `true` on 4 slots, submit → last result", ""]
    if "machine" in result:
        lines += [f"Machine: {machine_line(result['machine'])}", ""]
    labels = {"xcloud-mosquitto": "xcloud, Mosquitto (2 workers × 2 slots)",
              "xcloud-prefetch": f"xcloud, Mosquitto, `[jobs] prefetch = "
                                 f"{result.get('prefetch', 1)}` (2 × 2)",
              "xcloud-up": "xcloud, embedded broker (`xcloud up`, 2 × 2)",
              "xcloud-up-thread": "xcloud, `xcloud up`, broker in a thread (2 × 2)",
              "xcloud-instant": "xcloud, Mosquitto, 2 workers that run nothing (the "
                                "coordinator's ceiling)",
              "xcloud-results": "xcloud, Mosquitto, jobs that print a line and write a "
                                "small file (kept as data)",
              "celery-redis": "Celery + Redis (2 procs × concurrency 2)",
              "celery-rabbitmq": "Celery + RabbitMQ, rpc:// results (2 × 2)",
              "dask": "Dask LocalCluster (2 workers × 2 threads)"}
    rows = []
    for name, row in v.items():
        inner = row.get("run", row)
        cpu = inner.get("coordinator_cpu_ms_per_job")
        rows.append([labels.get(name, name),
                     fmt(inner.get("jobs_per_s")) if "error" not in row else "error",
                     fmt(inner.get("seconds"), 2),
                     fmt(cpu, 2) if cpu is not None else "–",
                     f"{fmt(row.get('others_pct'))} %"])
    lines += [md_table(["system", "jobs/s", "seconds", "coordinator CPU ms/job",
                        "other load"], rows), ""]
    roles = ("coordinator", "up", "broker", "workers", "client", "machine")
    rows = [[labels.get(name, name),
             *(fmt(cpu.get(role), 2) if role in cpu else "–" for role in roles)]
            for name, row in v.items()
            if (cpu := row.get("run", row).get("cpu_ms_per_job"))]
    if rows:
        lines += ["CPU ms per job by process (workers: with the commands they ran; "
                  "machine: all of it busy, others included):", "",
                  md_table(["system", *roles], rows), ""]
    rows = []
    for name in ("xcloud-mosquitto", "xcloud-prefetch", "xcloud-up", "xcloud-up-thread",
                 "xcloud-instant"):
        if name not in v or "error" in v[name]:
            continue
        x = _rate(v[name])
        rows.append([labels[name], ratio(x, _rate(v.get("celery-redis"))),
                     ratio(x, _rate(v.get("celery-rabbitmq"))), ratio(x, _rate(v.get("dask")))])
    if rows:
        lines += ["Ratios (same run; target ≥ 1.0×):", "",
                  md_table(["xcloud", "÷ Celery+Redis", "÷ Celery+RabbitMQ", "÷ Dask"], rows),
                  ""]
    rows = []
    for name in ("xcloud-mosquitto", "xcloud-prefetch", "xcloud-up", "xcloud-up-thread"):
        lat = v.get(name, {}).get("latency")
        if lat:
            r, s = lat["to_running_ms"], lat["to_started_ms"]
            rows.append([labels[name], fmt(r["p50"], 1), fmt(r["p99"], 1), fmt(s["p50"], 1),
                         fmt(s["p99"], 1)])
    if rows:
        lines += ["Submit → running on the idle pool (ms; 50 single jobs; target p50 ≤ 10):",
                  "", md_table(["xcloud", "→ event running p50", "p99",
                                "→ command started p50", "p99"], rows), ""]
    mq = v.get("xcloud-mosquitto", {})
    if "queued_run" in mq:
        q, base = mq["queued_run"], mq["run"]
        p = mq.get("pass", {})
        lines += [f"With {QUEUED:,} low-priority jobs queued (Mosquitto): "
                  f"{fmt(q['jobs_per_s'])} jobs/s ({ratio(q['jobs_per_s'], base['jobs_per_s'])}"
                  f" of the empty-queue rate), coordinator CPU "
                  f"{fmt(q['coordinator_cpu_ms_per_job'], 2)} ms/job; one scheduler pass "
                  f"over {fmt(p.get('queued'))} queued jobs: {fmt(p.get('busy_pass_ms'), 1)} ms "
                  f"assigning {p.get('assigned', '–')} jobs, "
                  f"{fmt(p.get('idle_pass_ms'), 2)} ms with no free slot.", ""]
    lines += _rounds_table(result, labels)
    for name, row in v.items():
        if "error" in row:
            lines += [f"- {name}: {row['error']}"]
    return "\n".join(lines).rstrip() + "\n"


def _rounds_table(result: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """With ``--rounds`` > 1: each xcloud variant's ratio to each peer, per round and
    the median of the rounds."""
    rounds: list[dict[str, float | None]] = result.get("rounds") or []
    if len(rounds) < 2:
        return []
    peers = [p for p in ("celery-redis", "celery-rabbitmq", "dask") if p in rounds[0]]
    rows = []
    for name in rounds[0]:
        if not name.startswith("xcloud-"):
            continue
        for peer in peers:
            values = [x / y for r in rounds
                      if (x := r.get(name)) is not None and (y := r.get(peer))]
            if values:
                rows.append([labels.get(name, name), f"÷ {peer}",
                             " / ".join(f"{x:.2f}×" for x in values),
                             f"{statistics.median(values):.2f}×"])
    rates = [[labels.get(name, name),
              " / ".join(fmt(r.get(name)) for r in rounds),
              fmt(statistics.median([x for r in rounds if (x := r.get(name))]))]
             for name in rounds[0] if any(r.get(name) for r in rounds)]
    return [f"{len(rounds)} rounds, every other one in reversed order (jobs/s; the first "
            "round is the rows above):", "", md_table(["system", "per round", "median"], rates),
            "", "Ratios per round and their median (target ≥ 1.0×):", "",
            md_table(["xcloud", "peer", "per round", "median"], rows), ""]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every variant this many times, interleaved (default 1)")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--prefetch", type=int, default=1,
                        help="[jobs] prefetch of the xcloud-prefetch variant (default 1)")


def main(argv: list[str] | None = None) -> int:
    return cli("jobs", (__doc__ or "jobs").split("\n\n")[0], run, markdown, add_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())

