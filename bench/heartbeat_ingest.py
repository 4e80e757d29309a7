"""Coordinator heartbeat ingest: how many ``worker.heartbeat`` messages per second the
coordinator validates, batches and writes, over Mosquitto and amqtt, SQLite and MariaDB.

Method (see BENCHMARKS.md for the numbers):

- a real ``Coordinator`` (bus, registry, store) runs in its own spawned process, as
  principal ``coordinator`` (role coordinator), with the default 0.2 s flush window.
  Brokers: Mosquitto; amqtt (``EmbeddedBroker``) in its own process; and
  ``amqtt-embedded``, the broker inside the coordinator's process as ``xcloud up`` and
  ``xcloud coordinator --embed-broker`` run it (broker and coordinator share one GIL);
- simulated workers: N worker ids (1,000 then 5,000 on SQLite; 1,000 on MariaDB in the
  default full run, since a 5,000-worker join takes ~25 s there). Each first publishes a valid
  ``worker.caps`` (QoS 1) so the coordinator knows it. The simulation connects as ONE
  principal, ``sim``, with role *coordinator* (allowed to publish on every worker's
  topics): 5,000 worker principals would mean 5,000 MQTT connections from Python
  clients. What creating them would cost is measured separately (``stage costs``).
  ``coordinator`` and ``sim`` are registered in the coordinator's database before it
  starts (as ``xcloud admin principal add --db``): it serves requests (the readiness
  ``ping``) only to live principals of its store;
- P publisher processes (3; 2 in --quick) pre-encode 20,000 valid heartbeats (10,000
  in --quick; ~370 B, the fields a real agent sends) round-robin over the N ids, wait at
  a common start, then publish them at QoS 0 as fast as paho allows. Mosquitto runs
  with ``max_queued_messages 0`` so a burst is queued, not dropped (``--mosquitto-queue
  1000``, its default, shows the drops);
- ingest rate = heartbeats written / time from the first to the last batch written
  (``registry.heartbeats_ingested``, polled every 2 ms inside the coordinator process);
  also end to end (first publish → last written). The coordinator's CPU is read with
  psutil, per thread. Written rows are counted in the database afterwards.
- simulated workers announce a 300 s heartbeat interval, so liveness never fires
  during the run (that is bench.liveness_scale's subject).

``--profile`` also samples the coordinator with py-spy (``--gil``: only the thread
holding the GIL, i.e. where the interpreter's time goes) during one run.

    python -m bench.heartbeat_ingest [--quick] [--configs mosquitto:sqlite,..] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.brokers import start_broker
from bench.coordinator_process import CoordinatorProcess, wait_coordinator_ready
from bench.cpu_load import LoadMonitor
from bench.databases import database, mariadb_available
from bench.identities import Identity, credentials, registered
from bench.machine import machine, machine_line
from bench.paho_clients import paho_close, paho_connect
from bench.processes import SPAWN, die_with_parent, quiet_logging
from bench.report import fmt, md_table, ratio
from bench.scratch import scratch_dir, unique_root
from bench.simulated_workers import heartbeat_payload, publish_caps

INTERVAL_S = 300.0
TARGET = 10_000.0  # heartbeats/s, SQLite via Mosquitto
FULL: dict[str, Any] = {"sizes": [1000, 5000], "count": 20_000, "publishers": 3,
        "configs": "mosquitto:sqlite:1000+5000,mosquitto:mariadb:1000,amqtt:sqlite:1000+5000,"
                   "amqtt:mariadb:1000,amqtt-embedded:sqlite:1000"}
QUICK: dict[str, Any] = {"sizes": [1000], "count": 10_000, "publishers": 2,
         "configs": "mosquitto:sqlite,amqtt:sqlite"}


def wid_of(i: int) -> str:
    return f"sim{i:05d}"


# ----------------------------------------------------------------------------- publishers


def _publisher(conn: Any, url: str, ident: Identity, root: str, n_workers: int, count: int,
               index: int, publishers: int) -> None:
    """Pre-encode this publisher's share of heartbeats, then publish them at QoS 0."""
    die_with_parent()
    quiet_logging()
    from schemas.topics import Topics

    topics = Topics(root)
    items = []
    for i in range(index, count, publishers):
        wid = wid_of(i % n_workers)
        items.append((topics.worker_heartbeat(wid),
                      heartbeat_payload(wid, i // n_workers + 1, INTERVAL_S)))
    client = paho_connect(url, ident, client_id=f"sim-pub-{index}")
    conn.send("ready")
    conn.recv()  # go
    t0 = time.monotonic()
    info = None
    for topic, payload in items:
        info = client.publish(topic, payload, 0)
    t_sent = time.monotonic()
    if info is not None:
        info.wait_for_publish(300)
    conn.send({"n": len(items), "t_start": t0, "t_sent": t_sent, "t_done": time.monotonic()})
    with contextlib.suppress(EOFError, OSError):
        conn.recv()
    paho_close(client)


def _spawn_publishers(url: str, ident: Identity, root: str, n_workers: int, count: int,
                      publishers: int) -> list[tuple[Any, Any]]:
    out = []
    for index in range(publishers):
        parent, child = SPAWN.Pipe()
        proc = SPAWN.Process(target=_publisher, daemon=True,
                             args=(child, url, ident, root, n_workers, count, index,
                                   publishers))
        proc.start()
        child.close()
        out.append((proc, parent))
    return out


def _stop_publishers(pubs: list[tuple[Any, Any]]) -> None:
    for _proc, conn in pubs:
        with contextlib.suppress(OSError, BrokenPipeError):
            conn.send("stop")
    for proc, conn in pubs:
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        conn.close()


# ----------------------------------------------------------------------------- py-spy


def _classify(stack: str) -> str:
    """Which stage a sampled stack belongs to (py-spy collapsed format)."""
    if "_write_loop" in stack or "record_heartbeats" in stack:
        if "states_of" in stack:
            return "writer: SELECT states"
        if "_sample_row" in stack or "_update_row" in stack:
            return "writer: build rows"
        if "write (coordinator/store.py" in stack:
            return "writer: INSERT/UPDATE"
        if "commit" in stack or "__exit__" in stack:
            return "writer: commit"
        return "writer: other"
    if "_run_lane" in stack:
        if "decode (schemas/codec.py" in stack:
            if "from_dict" in stack:
                return "lane: decode → dataclass"
            if "validate" in stack or "<string>" in stack:
                return "lane: decode → schema validation"
            if "loads" in stack:
                return "lane: decode → json.loads"
            return "lane: decode (other)"
        if "on_heartbeat" in stack:
            if "to_dict" in stack:
                return "lane: on_heartbeat → to_dict"
            return "lane: on_heartbeat (other)"
        if "get (queue.py" in stack:
            return "lane: queue.get"
        return "lane: other"
    if "loop_forever" in stack or "paho" in stack:
        if "_on_message" in stack and "bus.py" in stack:
            if "put (queue.py" in stack:
                return "paho thread: queue.put"
            return "paho thread: Bus._on_message"
        return "paho thread: read/parse MQTT"
    if "heartbeat-monitor" in stack or "liveness.py" in stack:
        return "liveness monitor"
    if any(f in stack for f in ("coordinator_process.py", "cpu_load.py", "identities.py")):
        return "bench sampler"  # the bench's code that runs in the coordinator's process
    return "other"


def pyspy_summary(path: Path) -> dict[str, Any]:
    buckets: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        try:
            count = int(count_s)
        except ValueError:
            continue
        total += count
        buckets[_classify(stack)] += count
        leaves[stack.split(";")[-1].strip()] += count
    return {
        "samples": total,
        "stages": {k: round(100.0 * v / total, 1) for k, v in buckets.most_common()},
        "top_leaves": [(k, round(100.0 * v / total, 1)) for k, v in leaves.most_common(12)],
    }


def start_pyspy(pid: int, duration: float, out: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("heartbeat_ingest: py-spy not found, no profile", file=sys.stderr)
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(duration))),
         "--rate", "250", "--gil", "--format", "raw", "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ----------------------------------------------------------------------------- one config


def run_config(broker_kind: str, db_kind: str, sizes: list[int], count: int, publishers: int,
               workdir: Path, profile: bool = False, profile_dir: Path | None = None,
               patches: tuple[str, ...] = (), mosquitto_queue: int | None = 0
               ) -> dict[str, Any]:
    root = unique_root("ingest")
    out: dict[str, Any] = {"broker": broker_kind, "db": db_kind, "phases": [],
                           "patches": list(patches)}
    options: dict[str, Any] = {}
    if broker_kind == "mosquitto":
        options["max_queued_messages"] = mosquitto_queue
        out["mosquitto_max_queued_messages"] = mosquitto_queue
    embedded = broker_kind == "amqtt-embedded"
    with database(db_kind, workdir) as db_url:
        # in the coordinator's database before it starts, as `xcloud admin principal add`
        ids = registered(db_url, root, ("coordinator", "coordinator"), ("sim", "coordinator"))
        broker = None if embedded else start_broker(broker_kind, ids, root, workdir, **options)
        coord = None
        try:
            coord = CoordinatorProcess(broker.url if broker else "", root, ids["coordinator"],
                                       db_url, workdir / f"home-{root}", patches=patches,
                                       embed_creds=credentials(ids) if embedded else None,
                                       default_heartbeat_s=INTERVAL_S).start()
            url = coord.url
            wait_coordinator_ready(url, ids["sim"], root)
            known = 0
            written = 0
            for n_workers in sizes:
                phase: dict[str, Any] = {"workers": n_workers, "count": count}
                # join: caps for the new ids, until the coordinator tracks them all
                t0 = time.monotonic()
                publish_caps(url, ids["sim"], root,
                             [wid_of(i) for i in range(known, n_workers)], INTERVAL_S)

                def tracked(n: int = n_workers) -> bool:
                    return bool(coord.call("stats")["tracked"] >= n)

                deadline = time.monotonic() + 300
                while not tracked():
                    if time.monotonic() > deadline:
                        raise TimeoutError("workers did not all join")
                    time.sleep(0.05)
                phase["join_s"] = time.monotonic() - t0
                phase["joined"] = n_workers - known
                known = n_workers
                # heartbeats
                pubs = _spawn_publishers(url, ids["sim"], root, n_workers, count,
                                         publishers)
                try:
                    for _, conn in pubs:
                        if not conn.poll(120):
                            raise TimeoutError("publisher not ready")
                        conn.recv()
                    coord.call("arm", count, 5.0, 300.0)
                    load = LoadMonitor().start()
                    spy = None
                    spy_out = workdir / f"pyspy-{broker_kind}-{db_kind}-{n_workers}.txt"
                    if profile:
                        spy = start_pyspy(coord.pid, count / 4000.0 + 2, spy_out)
                        time.sleep(0.5)  # let py-spy attach
                    for _, conn in pubs:
                        conn.send("go")
                    pub_results = []
                    for _, conn in pubs:
                        if not conn.poll(300):
                            raise TimeoutError("publisher did not finish")
                        pub_results.append(conn.recv())
                    res = coord.call("wait", 400, timeout=420)
                    phase["others_pct"] = load.stop()["others_pct"]
                    if spy is not None:
                        spy.wait(120)
                        if spy_out.exists():
                            phase["profile"] = pyspy_summary(spy_out)
                            if profile_dir:
                                profile_dir.mkdir(parents=True, exist_ok=True)
                                shutil.copy(spy_out, profile_dir / spy_out.name)
                finally:
                    _stop_publishers(pubs)
                written += res["n"]
                t_pub0 = min(p["t_start"] for p in pub_results)
                t_pub1 = max(p["t_sent"] for p in pub_results)
                span = (res["last_t"] or 0) - (res["first_t"] or 0)
                phase.update({
                    "ingested": res["n"],
                    "lost": count - res["n"],
                    "offered_per_s": count / max(1e-9, t_pub1 - t_pub0),
                    "ingest_per_s": (res["n"] - res["first_n"]) / span if span > 0 else None,
                    "end_to_end_per_s": res["n"] / max(1e-9, (res["last_t"] or 0) - t_pub0),
                    "first_written_after_s": (res["first_t"] or 0) - t_pub0,
                    "coord_cpu_pct": 100.0 * res["cpu_s"] / max(1e-9, res["t_end"] - res["t_arm"]),
                    "coord_cpu_s": res["cpu_s"],
                    "cpu_us_per_heartbeat": 1e6 * res["cpu_s"] / max(1, res["n"]),
                    "threads": {k: round(v, 2) for k, v in sorted(
                        res["threads"].items(), key=lambda kv: -kv[1]) if v >= 0.05},
                    "max_lane_backlog": res["max_lane_backlog"],
                })
                out["phases"].append(phase)
            out["rows"] = coord.call("rows")
            out["rows_expected"] = written
        finally:
            if coord is not None:
                coord.stop()
            if broker is not None:
                broker.stop()
    return out


# ----------------------------------------------------------------------------- stage costs


def stage_costs(workdir: Path, db_kinds: list[str], n: int = 5000) -> dict[str, Any]:
    """Per-heartbeat cost of each stage, single-threaded in this process."""
    from broker.bus import Incoming
    from broker.credentials import hash_token, new_token
    from coordinator.bootstrap import issue_token
    from coordinator.registry import WorkerRegistry
    from coordinator.store import Store
    from schemas.codec import decode
    from schemas.topics import Topics

    topics = Topics("stage")
    wids = [wid_of(i) for i in range(1000)]
    items = [(topics.worker_heartbeat(wids[i % 1000]),
              heartbeat_payload(wids[i % 1000], i // 1000 + 1, INTERVAL_S)) for i in range(n)]
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    envs = [decode(p, topic=t) for t, p in items]
    out["decode_us"] = 1e6 * (time.perf_counter() - t0) / n

    sink: list[Any] = []
    reg = WorkerRegistry(None, topics, liveness_factor=2, default_interval=INTERVAL_S,  # type: ignore[arg-type]
                         flush_s=0.2, publish_event=sink.append,
                         request_caps=lambda _w, _b: None)
    for w in wids:
        reg.monitor.track(w, time.time(), INTERVAL_S)
    incomings = [Incoming(t, e, None) for (t, _), e in zip(items, envs)]
    t0 = time.perf_counter()
    for inc in incomings:
        reg.on_heartbeat(inc)
    out["on_heartbeat_us"] = 1e6 * (time.perf_counter() - t0) / n
    batch = list(reg._batch)

    t0 = time.perf_counter()
    tokens = [new_token() for _ in range(200)]
    hashes = [hash_token(t) for t in tokens]
    out["hash_token_ms"] = 1e3 * (time.perf_counter() - t0) / len(hashes)

    for kind in db_kinds:
        with database(kind, workdir) as url:
            store = Store.open(url)
            try:
                from bench.simulated_workers import caps_payload
                from schemas.codec import decode as dec

                now = time.time()
                t0 = time.perf_counter()
                for w in wids:
                    store.upsert_worker_caps(w, dec(caps_payload(w, INTERVAL_S)).body.to_dict(),
                                             now)
                out[f"{kind}_caps_upsert_ms"] = 1e3 * (time.perf_counter() - t0) / len(wids)
                times = []
                for chunk_start in range(0, len(batch), 1000):
                    chunk = batch[chunk_start:chunk_start + 1000]
                    t0 = time.perf_counter()
                    store.record_heartbeats(chunk)
                    times.append((time.perf_counter() - t0) / len(chunk))
                out[f"{kind}_record_us"] = 1e6 * sorted(times)[len(times) // 2]
                t0 = time.perf_counter()
                for i in range(100):
                    issue_token(store, f"p{i:04d}", "worker")
                out[f"{kind}_issue_token_ms"] = 1e3 * (time.perf_counter() - t0) / 100
            finally:
                store.close()
    return out


# ----------------------------------------------------------------------------- run


def run(quick: bool = False, configs: str | None = None, profile: bool = False,
        count: int | None = None, profile_dir: Path | None = None,
        what_if: str | None = None, sizes: str | None = None,
        mosquitto_queue: int | None = 0) -> dict[str, Any]:
    plan = dict(QUICK if quick else FULL)
    if configs:
        plan["configs"] = configs
    if count:
        plan["count"] = count
    if sizes:
        plan["sizes"] = [int(x) for x in sizes.split(",") if x.strip()]
    triples = []
    for item in plan["configs"].split(","):
        parts = item.strip().split(":")
        n_list = (plan["sizes"] if sizes or len(parts) < 3 or not parts[2]
                  else [int(x) for x in parts[2].split("+")])
        triples.append((parts[0], parts[1] if len(parts) > 1 and parts[1] else "sqlite",
                        n_list))
    if any(d == "mariadb" for _, d, _ in triples) and not mariadb_available():
        print("heartbeat_ingest: MariaDB not reachable, skipping it", file=sys.stderr)
        triples = [t for t in triples if t[1] != "mariadb"]
    db_kinds = sorted({d for _, d, _ in triples}, key=["sqlite", "mariadb"].index)
    started = time.monotonic()
    results = []
    with scratch_dir() as workdir:
        stages = stage_costs(workdir, db_kinds)
        for broker_kind, db_kind, n_list in triples:
            print(f"heartbeat_ingest: {broker_kind} + {db_kind}, {n_list} workers ...",
                  file=sys.stderr, flush=True)
            do_profile = profile and broker_kind == "mosquitto" and db_kind == "sqlite"
            results.append(run_config(broker_kind, db_kind, n_list, plan["count"],
                                      plan["publishers"], workdir, do_profile,
                                      profile_dir, mosquitto_queue=mosquitto_queue))
            if what_if:
                patches = tuple(p.strip() for p in what_if.split(",") if p.strip())
                print(f"heartbeat_ingest: {broker_kind} + {db_kind} with "
                      f"{'+'.join(patches)} ...", file=sys.stderr, flush=True)
                results.append(run_config(broker_kind, db_kind, n_list,
                                          plan["count"], plan["publishers"], workdir,
                                          patches=patches))
    return {"benchmark": "heartbeat_ingest", "quick": quick, "plan": plan, "target": TARGET,
            "stages": stages, "configs": results, "machine": machine(),
            "elapsed_s": round(time.monotonic() - started, 1)}


# ----------------------------------------------------------------------------- report


def _label(cfg: dict[str, Any]) -> str:
    notes = list(cfg.get("patches") or [])
    queue = cfg.get("mosquitto_max_queued_messages")
    if queue:
        notes.append(f"max_queued_messages {queue}")
    broker: str = cfg["broker"]
    return broker + (f" ({', '.join(notes)})" if notes else "")


def markdown(result: dict[str, Any]) -> str:
    rows = []
    by_key: dict[tuple[str, str, int], dict[str, Any]] = {}
    for cfg in result["configs"]:
        for ph in cfg["phases"]:
            if _label(cfg) == cfg["broker"]:
                by_key[(cfg["broker"], cfg["db"], ph["workers"])] = ph
            rows.append([
                _label(cfg), cfg["db"], f"{ph['workers']:,}",
                f"{ph['ingested']:,}/{ph['count']:,}",
                fmt(ph["offered_per_s"]), fmt(ph["ingest_per_s"]), fmt(ph["end_to_end_per_s"]),
                ratio(ph["ingest_per_s"], result["target"]),
                fmt(ph["coord_cpu_pct"]), fmt(ph["cpu_us_per_heartbeat"]),
                fmt(1e6 / ph["cpu_us_per_heartbeat"]) if ph["cpu_us_per_heartbeat"] else "–",
                fmt(ph["join_s"], 1), fmt(ph.get("others_pct")),
            ])
    table = md_table(["broker", "db", "workers", "written/sent", "offered/s",
                      "ingested/s (first→last write)", "ingested/s (end to end)",
                      "vs 10k/s target", "coordinator CPU %", "CPU µs/heartbeat",
                      "one-core ceiling/s (10⁶ ÷ µs)", "join (s)", "other load %"], rows)
    ratios = []
    for n in sorted({k[2] for k in by_key}):
        def rate(b: str, d: str, n: int = n) -> float | None:
            ph = by_key.get((b, d, n))
            return ph["ingest_per_s"] if ph else None
        ratios.append([f"{n:,} workers",
                       ratio(rate("amqtt", "sqlite"), rate("mosquitto", "sqlite")),
                       ratio(rate("amqtt", "mariadb"), rate("mosquitto", "mariadb")),
                       ratio(rate("mosquitto", "mariadb"), rate("mosquitto", "sqlite")),
                       ratio(rate("amqtt", "mariadb"), rate("amqtt", "sqlite")),
                       ratio(rate("amqtt-embedded", "sqlite"), rate("amqtt", "sqlite"))])
    ratio_table = md_table(["", "amqtt/Mosquitto (SQLite)", "amqtt/Mosquitto (MariaDB)",
                            "MariaDB/SQLite (Mosquitto)", "MariaDB/SQLite (amqtt)",
                            "amqtt in-process / amqtt own process (SQLite)"], ratios)
    threads = []
    for cfg in result["configs"]:
        for ph in cfg["phases"]:
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(ph["threads"].items())[:4])
            threads.append([f"{_label(cfg)}+{cfg['db']} {ph['workers']:,}", top,
                            fmt(ph["max_lane_backlog"])])
    thread_table = md_table(["run", "coordinator CPU seconds by thread", "max lane backlog"],
                            threads)
    s = result["stages"]
    stage_rows = [
        ["decode + validate one heartbeat (codec.decode)", f"{s['decode_us']:.1f} µs"],
        ["registry.on_heartbeat (no DB)", f"{s['on_heartbeat_us']:.1f} µs"],
    ]
    for kind in ("sqlite", "mariadb"):
        if f"{kind}_record_us" in s:
            stage_rows.append([f"store.record_heartbeats, {kind}, per row (batches of 1,000)",
                               f"{s[f'{kind}_record_us']:.1f} µs"])
            stage_rows.append([f"store.upsert_worker_caps, {kind}, per worker",
                               f"{s[f'{kind}_caps_upsert_ms']:.2f} ms"])
            stage_rows.append([f"issue_token ($7$ hash + insert), {kind}, per principal",
                               f"{s[f'{kind}_issue_token_ms']:.2f} ms"])
    stage_rows.append(["hash_token alone ($7$, 101 × PBKDF2-SHA512)",
                       f"{s['hash_token_ms']:.3f} ms"])
    stage_table = md_table(["stage (single thread, in process)", "cost"], stage_rows)
    parts = [
        f"### heartbeat_ingest ({'quick' if result['quick'] else 'full'})",
        "",
        f"Measured {machine_line(result['machine'])}.",
        "",
        table,
        "",
        ratio_table,
        "",
        thread_table,
        "",
        stage_table,
    ]
    for cfg in result["configs"]:
        for ph in cfg["phases"]:
            prof = ph.get("profile")
            if prof:
                parts += ["", f"py-spy --gil, {cfg['broker']}+{cfg['db']}, {ph['workers']:,} "
                          f"workers ({prof['samples']} samples): share of GIL time", "",
                          md_table(["stage", "%"], list(prof["stages"].items())), "",
                          md_table(["top frames (self)", "%"], prof["top_leaves"])]
    rows_ok = all(c.get("rows") == c.get("rows_expected") for c in result["configs"])
    parts += ["", f"Sample rows in the database match heartbeats written: "
              f"{'yes' if rows_ok else 'NO'}."]
    return "\n".join(parts)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", help="comma-separated broker:db[:1000+5000]; brokers "
                        "mosquitto, amqtt (own process), amqtt-embedded (in the "
                        "coordinator's process, as `xcloud up`); dbs sqlite, mariadb")
    parser.add_argument("--count", type=int, help="heartbeats per run")
    parser.add_argument("--profile", action="store_true",
                        help="sample the coordinator with py-spy (Mosquitto + SQLite)")
    parser.add_argument("--sizes", help="comma-separated worker counts, e.g. 1000,5000")
    parser.add_argument("--mosquitto-queue", type=int, default=0,
                        help="Mosquitto max_queued_messages (default 0 = unlimited; "
                        "Mosquitto's own default, 1000, drops QoS 0 heartbeats in a burst)")
    parser.add_argument("--what-if", help="also run each config with these coordinator "
                        "monkeypatches (measuring a suggested change): "
                        "body-fields, switch-interval")
    parser.add_argument("--profile-dir", type=Path,
                        help="keep py-spy's raw (collapsed) stacks in this directory")


def main(argv: list[str] | None = None) -> int:
    from bench.report import cli

    return cli("heartbeat_ingest", "Coordinator heartbeat ingest rate.", run, markdown,
               add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
