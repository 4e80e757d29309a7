"""Liveness at scale: how long until the coordinator notices a silent worker among many.

Method:

- a real ``Coordinator`` in its own process (liveness factor 2), SQLite by default,
  over Mosquitto, amqtt in its own process, or amqtt inside the coordinator's process
  (``amqtt-embedded``, as ``xcloud up`` runs it);
- N simulated workers (5,000 over Mosquitto, 2,000 over amqtt-embedded, 1,000 in
  --quick) heartbeating every I = 2 s, their
  heartbeats spread evenly over the interval (N / I heartbeats/s in total) by 2
  publisher processes. As in bench.heartbeat_ingest, the simulation is ONE principal
  with role coordinator (``sim``), publishing each worker's ``worker.caps`` (QoS 1)
  and then its heartbeats (QoS 0, fresh ``seq``/``id``/``ts`` each time). Its
  principals (``coordinator``, ``sim``, ``watcher``) are registered in the
  coordinator's database before it starts, as ``xcloud admin principal add --db`` does;
- all workers announce themselves at once (a join storm, as after a coordinator or
  broker restart); once all are tracked and no worker has been marked lost for two
  intervals (within 60 s, else the run is reported as overloaded, with its false
  alarms), the coordinator's load is measured for two intervals, then K victims (10; 5 in
  --quick), chosen at random, are silenced one after another, staggered over one
  interval (so they stop at random points of their own interval): their
  heartbeats just stop, there is no last will and no ``offline`` status (a frozen or
  partitioned worker, not a clean exit);
- an admin principal subscribes to ``{root}/event/worker/+`` and timestamps each
  ``lost`` event. Reported per victim: time from its last heartbeat sent to the event,
  and from the moment it was silenced, both in units of I. With factor 2 the deadline
  is last heartbeat + 2 I, so the ideal is 2.0 I after the last heartbeat and 1–2 I
  after the silencing (depending on where in its interval the worker stopped);
- also counted: ``lost`` events for healthy workers (false alarms), the publishers'
  worst lateness against their schedule, and the coordinator's CPU in steady state.

    python -m bench.liveness_scale [--quick] [--configs mosquitto:sqlite,amqtt-embedded:sqlite]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.brokers import start_broker
from bench.coordinator_process import CoordinatorProcess
from bench.cpu_load import CpuMeter
from bench.databases import database
from bench.identities import Identity, credentials, registered
from bench.machine import machine, machine_line
from bench.paho_clients import paho_close, paho_connect
from bench.processes import SPAWN, die_with_parent, quiet_logging
from bench.report import fmt, md_table
from bench.scratch import scratch_dir, unique_root
from bench.simulated_workers import caps_payload, heartbeat_payload

FACTOR = 2.0
FULL: dict[str, Any] = {"workers": 5000, "interval": 2.0, "victims": 10, "publishers": 2,
        "configs": "mosquitto:sqlite:5000,amqtt-embedded:sqlite:2000"}
QUICK: dict[str, Any] = {"workers": 1000, "interval": 2.0, "victims": 5, "publishers": 2,
         "configs": "mosquitto:sqlite"}
TARGET_INTERVALS = 2.0
JOIN_LIMIT_S = 60.0  # a coordinator that has not tracked every worker by then is overloaded


def wid_of(i: int) -> str:
    return f"live{i:05d}"


# ----------------------------------------------------------------------------- heartbeater


def _heartbeater(conn: Any, url: str, ident: Identity, root: str, wids: list[str],
                 interval: float, index: int, max_s: float) -> None:
    """Publish caps for ``wids``, then heartbeat each every ``interval`` on a fixed phase.

    Pipe commands: ``("silence", wid)`` → replies ``("silenced", wid, last_sent)``;
    ``("stop",)`` → replies with stats and exits.
    """
    die_with_parent()
    quiet_logging()
    from schemas.topics import Topics

    topics = Topics(root)
    client = paho_connect(url, ident, client_id=f"sim-live-{index}")
    conn.send("ready")
    conn.recv()  # go
    for w in wids:
        client.publish(topics.worker_caps(w), caps_payload(w, interval), 1)
    start = time.monotonic()
    n = len(wids)
    schedule = collections.deque((start + interval * k / n, w) for k, w in enumerate(wids))
    seq = dict.fromkeys(wids, 0)
    last_sent: dict[str, float] = {}
    silenced: set[str] = set()
    sent = 0
    worst_late = 0.0
    deadline = start + max_s
    stopping = False
    while not stopping and time.monotonic() < deadline:
        while conn.poll(0):
            cmd = conn.recv()
            if cmd[0] == "silence":
                silenced.add(cmd[1])
                conn.send(("silenced", cmd[1], last_sent.get(cmd[1]), time.monotonic()))
            elif cmd[0] == "stop":
                stopping = True
        now = time.monotonic()
        while schedule and schedule[0][0] <= now:
            due, w = schedule.popleft()
            if w in silenced:
                continue
            seq[w] += 1
            client.publish(topics.worker_heartbeat(w),
                           heartbeat_payload(w, seq[w], interval, validate=False), 0)
            sent += 1
            stamp = time.monotonic()
            last_sent[w] = stamp
            worst_late = max(worst_late, stamp - due)
            schedule.append((due + interval, w))
        wait = (schedule[0][0] - time.monotonic()) if schedule else 0.05
        time.sleep(min(0.005, max(0.0, wait)))
    conn.send(("stats", {"sent": sent, "worst_late_s": worst_late}))
    paho_close(client)


class _Heartbeater:
    def __init__(self, url: str, ident: Identity, root: str, wids: list[str],
                 interval: float, index: int, max_s: float) -> None:
        self.wids = set(wids)
        self.conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=_heartbeater, daemon=True,
                                  args=(child, url, ident, root, wids, interval, index, max_s))
        self.proc.start()
        child.close()

    def recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError("heartbeater did not answer")
        return self.conn.recv()

    def stop(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        with contextlib.suppress(OSError, BrokenPipeError, TimeoutError):
            self.conn.send(("stop",))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                msg = self.recv(max(0.1, deadline - time.monotonic()))
                if msg[0] == "stats":
                    stats = msg[1]
                    break
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()
        return stats


# ----------------------------------------------------------------------------- one config


def run_config(broker_kind: str, db_kind: str, workers: int, interval: float, victims: int,
               publishers: int, workdir: Path, patches: tuple[str, ...] = ()
               ) -> dict[str, Any]:
    root = unique_root("live")
    wids = [wid_of(i) for i in range(workers)]
    events: list[tuple[float, str]] = []  # (when, wid) of every "lost" event
    lock = threading.Lock()

    def on_event(_c: Any, _userdata: Any, msg: Any) -> None:
        with contextlib.suppress(ValueError, AttributeError):
            body = json.loads(msg.payload)
            if body.get("new_state") == "lost":
                with lock:
                    events.append((time.monotonic(), str(body.get("wid"))))

    def lost_count() -> int:
        with lock:
            return len(events)

    out: dict[str, Any] = {"broker": broker_kind, "db": db_kind, "workers": workers,
                           "patches": list(patches),
                           "interval_s": interval, "factor": FACTOR, "victims": [],
                           "missed": 0, "false_lost_join": 0, "false_lost_steady": 0}
    embedded = broker_kind == "amqtt-embedded"
    with database(db_kind, workdir) as db_url:
        # in the coordinator's database before it starts, as `xcloud admin principal add`
        ids = registered(db_url, root, ("coordinator", "coordinator"), ("sim", "coordinator"),
                         ("watcher", "admin"))
        broker = None if embedded else start_broker(broker_kind, ids, root, workdir)
        coord = watcher = None
        beaters: list[_Heartbeater] = []
        try:
            coord = CoordinatorProcess(broker.url if broker else "", root, ids["coordinator"],
                                       db_url, workdir / f"home-{root}",
                                       embed_creds=credentials(ids) if embedded else None,
                                       patches=patches, liveness_factor=FACTOR,
                                       default_heartbeat_s=interval).start()
            url = coord.url
            watcher = paho_connect(url, ids["watcher"], on_message=on_event,
                                   subscribe=[(f"{root}/event/worker/+", 0)])
            for p in range(publishers):
                beaters.append(_Heartbeater(url, ids["sim"], root,
                                            wids[p::publishers], interval, p, 300.0))
            for b in beaters:
                b.recv(120)
            t_go = time.monotonic()
            for b in beaters:
                b.conn.send("go")
            # join storm: every worker announces itself and starts heartbeating at once
            deadline = t_go + JOIN_LIMIT_S
            tracked = 0
            while time.monotonic() < deadline:
                tracked = coord.call("stats")["tracked"]
                if tracked >= workers:
                    break
                time.sleep(0.1)
            out["join_s"] = time.monotonic() - t_go
            out["tracked"] = tracked
            # settle: all tracked, and no "lost" event for two intervals
            quiet_since, seen = time.monotonic(), lost_count()
            while time.monotonic() < deadline + FACTOR * interval:
                now_seen = lost_count()
                if now_seen != seen:
                    quiet_since, seen = time.monotonic(), now_seen
                tracked = coord.call("stats")["tracked"]
                if tracked >= workers and time.monotonic() - quiet_since >= FACTOR * interval:
                    break
                time.sleep(0.1)
            out["settled_s"] = time.monotonic() - t_go
            out["false_lost_join"] = lost_count()
            # steady state: two intervals, measuring the coordinator's load
            meter = CpuMeter(coord.pid).start()
            before = coord.call("stats")["ingested"]
            time.sleep(FACTOR * interval)
            steady = meter.stop()
            after = coord.call("stats")
            out["steady_cpu_pct"] = steady["cpu_pct"]
            out["steady_ingest_per_s"] = (after["ingested"] - before) / steady["wall_s"]
            out["steady_backlog"] = after["backlog"]
            out["tracked"] = after["tracked"]
            out["overloaded"] = after["tracked"] < workers or lost_count() > seen
            if out["overloaded"]:
                # the coordinator never caught up: no victims to time
                out["false_lost_steady"] = lost_count() - out["false_lost_join"]
                return _finish(out, beaters, watcher, coord, broker)
            mark = lost_count()
            # silence victims (random, so at random phases of their interval), staggered
            # over one interval
            picks = random.Random(workers * 7919 + victims).sample(wids, victims)
            silenced: dict[str, tuple[float, float]] = {}
            for k, wid in enumerate(picks):
                target = next(b for b in beaters if wid in b.wids)
                target.conn.send(("silence", wid))
                msg = target.recv(10)
                silenced[wid] = (msg[2], msg[3])  # last heartbeat sent, silenced at
                if k + 1 < victims:
                    time.sleep(interval / victims)

            def first_lost_after(wid: str, t0: float) -> float | None:
                with lock:
                    return next((t for t, w in events[mark:] if w == wid and t >= t0), None)

            wait_until = time.monotonic() + (FACTOR + 2) * interval + 5
            while time.monotonic() < wait_until:
                if all(first_lost_after(w, silenced[w][1]) for w in picks):
                    break
                time.sleep(0.01)
            rows = []
            for wid in picks:
                last, at = silenced[wid]
                t = first_lost_after(wid, at)
                rows.append({
                    "wid": wid,
                    "from_last_beat_I": (t - last) / interval if t and last else None,
                    "from_silenced_I": (t - at) / interval if t else None,
                })
            out["victims"] = rows
            out["missed"] = sum(1 for r in rows if r["from_last_beat_I"] is None)
            with lock:
                out["false_lost_steady"] = sum(1 for _, w in events[mark:] if w not in silenced)
        finally:
            _finish(out, beaters, watcher, coord, broker)
    return out


def _finish(out: dict[str, Any], beaters: list[_Heartbeater], watcher: Any, coord: Any,
            broker: Any) -> dict[str, Any]:
    """Stop everything of one config (idempotent) and summarise the victims."""
    if beaters:
        stats = [b.stop() for b in beaters]
        beaters.clear()
        out["publisher_worst_late_s"] = max((s.get("worst_late_s", 0.0) for s in stats),
                                            default=None)
        out["heartbeats_sent"] = sum(s.get("sent", 0) for s in stats)
    if watcher is not None:
        paho_close(watcher)
    if coord is not None:
        coord.stop()
    if broker is not None:
        broker.stop()
    victims = out.get("victims") or []
    vals = [r["from_last_beat_I"] for r in victims if r["from_last_beat_I"] is not None]
    sil = [r["from_silenced_I"] for r in victims if r["from_silenced_I"] is not None]
    out["max_from_last_beat_I"] = max(vals) if vals else None
    out["min_from_last_beat_I"] = min(vals) if vals else None
    out["max_from_silenced_I"] = max(sil) if sil else None
    out["min_from_silenced_I"] = min(sil) if sil else None
    return out


# ----------------------------------------------------------------------------- run


def run(quick: bool = False, configs: str | None = None, workers: int | None = None,
        victims: int | None = None, what_if: str | None = None) -> dict[str, Any]:
    plan = dict(QUICK if quick else FULL)
    if configs:
        plan["configs"] = configs
    if workers:
        plan["workers"] = workers
    if victims:
        plan["victims"] = victims
    started = time.monotonic()
    results = []
    with scratch_dir() as workdir:
        for item in plan["configs"].split(","):
            parts = item.strip().split(":")
            broker_kind = parts[0]
            db_kind = parts[1] if len(parts) > 1 and parts[1] else "sqlite"
            n = int(parts[2]) if len(parts) > 2 and not workers else plan["workers"]
            print(f"liveness_scale: {broker_kind} + {db_kind}, {n} workers ...",
                  file=sys.stderr, flush=True)
            results.append(run_config(broker_kind, db_kind, n, plan["interval"],
                                      plan["victims"], plan["publishers"], workdir))
            if what_if:
                patches = tuple(p.strip() for p in what_if.split(",") if p.strip())
                print(f"liveness_scale: again with {'+'.join(patches)} ...", file=sys.stderr,
                      flush=True)
                results.append(run_config(broker_kind, db_kind, n, plan["interval"],
                                          plan["victims"], plan["publishers"], workdir,
                                          patches))
    return {"benchmark": "liveness_scale", "quick": quick, "plan": plan,
            "target_intervals": TARGET_INTERVALS, "results": results, "machine": machine(),
            "elapsed_s": round(time.monotonic() - started, 1)}


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for r in result["results"]:
        rows.append([
            f"{r['broker']} + {r['db']}" + (f" ({'+'.join(r['patches'])})"
                                            if r.get("patches") else ""),
            f"{r['workers']:,}", f"{r['interval_s']:g} s",
            (f"{len(r['victims']) - r['missed']}/{len(r['victims'])}" if not r["overloaded"]
             else f"overloaded: {r['tracked']:,} tracked after {r['settled_s']:.0f} s"),
            f"{fmt(r['min_from_last_beat_I'], 2)}–{fmt(r['max_from_last_beat_I'], 2)}",
            f"{fmt(r['min_from_silenced_I'], 2)}–{fmt(r['max_from_silenced_I'], 2)}",
            f"{r['false_lost_join']} / {r['false_lost_steady']}",
            fmt(r["steady_ingest_per_s"]), fmt(r["steady_cpu_pct"]),
            fmt(r["publisher_worst_late_s"] * 1000 if r.get("publisher_worst_late_s")
                is not None else None), fmt(r["join_s"], 1), fmt(r.get("steady_backlog")),
        ])
    table = md_table(["broker + db", "workers", "interval I", "lost detected",
                      "last heartbeat → lost (I), min–max", "silenced → lost (I), min–max",
                      "false alarms: join storm / steady", "heartbeats/s ingested",
                      "coordinator CPU %",
                      "publisher worst lateness (ms)", "join (s)",
                      "heartbeat lane backlog"], rows)
    return "\n".join([
        f"### liveness_scale ({'quick' if result['quick'] else 'full'})",
        "",
        f"Measured {machine_line(result['machine'])}.",
        "",
        table,
        "",
        f"Liveness factor {FACTOR:g}: the deadline is the last heartbeat + {FACTOR:g} I. "
        f"Target: lost within {result['target_intervals']:g} intervals.",
    ])


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs",
                        help="comma-separated broker:db[:workers]; brokers mosquitto, amqtt, "
                        "amqtt-embedded; dbs sqlite, mariadb")
    parser.add_argument("--workers", type=int, help="simulated workers")
    parser.add_argument("--victims", type=int, help="workers to silence")
    parser.add_argument("--what-if", help="also run each config with these coordinator "
                        "monkeypatches: body-fields, switch-interval")


def main(argv: list[str] | None = None) -> int:
    from bench.report import cli

    return cli("liveness_scale", "Time to detect a silent worker among many.", run, markdown,
               add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
