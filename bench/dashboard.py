"""The dashboard and the stored time series: first load, live-update cost, table sizes.

Method (numbers in BENCHMARKS.md):

1. **Live grid.** Mosquitto, a real ``Coordinator`` with its dashboard in its own spawned
   process (SQLite), and N simulated workers (1,000; 200 with --quick): one publisher
   process announces them (``worker.caps``) and then sends every worker's heartbeat
   every 5 s, paced evenly, for the whole run.
   - *First load*: headless Chromium (Debian's, through Selenium) logs in, then opens
     ``/#/workers`` in a fresh tab and waits until the table shows every worker; the time
     from navigation start to that moment, and the bytes transferred (Resource Timing
     ``transferSize``: gzip where the server compresses). Without Chromium only the
     HTTP numbers are printed: each file and API call fetched once, raw and gzipped.
   - *Watching*: the coordinator process's CPU over a window with no page open, then
     with 5 live pages (5 ``/api/events`` streams, which is what an open page holds), and
     the bytes each stream received per second.
2. **A month of 5,000 workers** (500 with --quick) at a 5 s heartbeat, with the default
   ``[monitoring]`` tiers, through the real roll-up and retention (``Rollup``) on SQLite
   with synthetic timestamps. Heartbeat rows are written where a tier will keep what
   they become: at full rate (5 s) for the last hour, one per minute for the last day,
   one per 15 minutes for the last 8 days, one per hour before. Row counts and row sizes
   of every table are those of a month at full rate (only ``n`` inside buckets differs);
   writing 2.6 billion samples would take this machine days.

    python -m bench.dashboard [--quick] [--workers N] [--month-workers N] [--no-browser]
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bench.brokers import start_broker
from bench.identities import Identity, registered
from bench.machine import machine, machine_line
from bench.paho_clients import paho_close, paho_connect
from bench.processes import SPAWN, die_with_parent, quiet_logging
from bench.report import cli, fmt, md_table
from bench.scratch import scratch_dir, unique_root
from bench.simulated_workers import heartbeat_payload, publish_caps

HEARTBEAT_S = 5.0
WATCHERS = 5
FILES = ("/", "/static/app.js", "/static/app.css", "/static/vendor/uPlot.iife.min.js",
         "/static/vendor/uPlot.min.css")
APIS = ("/api/me", "/api/overview", "/api/workers")


# ----------------------------------------------------------------------------- processes


def _coordinator_main(conn: Any, bus_url: str, root: str, ident: Identity, db_url: str,
                      home: str) -> None:
    """Child: a Coordinator serving its dashboard on a free port of 127.0.0.1."""
    die_with_parent()
    quiet_logging()
    os.environ["XCLOUD_HOME"] = home
    from broker.config import BusConfig, Config
    from coordinator.service import Coordinator
    from coordinator.store import Store

    store = Store.open(db_url)
    cfg = Config()
    cfg.home = Path(home)
    cfg.coordinator.data_dir = str(Path(home) / "data")
    cfg.coordinator.db = db_url
    cfg.bus = BusConfig(url=bus_url, principal=ident.id, token=ident.token, root=root)
    cfg.monitoring.http = True
    cfg.monitoring.http_port = 0
    coordinator = Coordinator(cfg, store)
    coordinator.start(wait=True)
    assert coordinator.dashboard is not None
    try:
        conn.send((os.getpid(), coordinator.dashboard.url.rstrip("/")))
        with contextlib.suppress(EOFError, OSError):
            conn.recv()
    finally:
        coordinator.stop()
        store.close()


def _heartbeats_main(conn: Any, url: str, ident: Identity, root: str, n: int) -> None:
    """Child: every worker's heartbeat every HEARTBEAT_S, paced evenly, until told to stop."""
    die_with_parent()
    quiet_logging()
    from schemas.topics import Topics

    topics = Topics(root)
    wids = [f"sim{i:05d}" for i in range(n)]
    client = paho_connect(url, ident, client_id="bench-dashboard-hb")
    seq = 0
    gap = HEARTBEAT_S / max(1, n)
    start = time.monotonic()
    try:
        while not conn.poll():
            seq += 1
            for index, wid in enumerate(wids):
                due = start + (seq - 1) * HEARTBEAT_S + index * gap
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                client.publish(topics.worker_heartbeat(wid),
                               heartbeat_payload(wid, seq, HEARTBEAT_S, validate=False), 0)
    finally:
        paho_close(client)


def _spawn(target: Any, *args: Any) -> tuple[Any, Any]:
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def _stop(proc: Any, conn: Any) -> None:
    with contextlib.suppress(OSError, BrokenPipeError):
        conn.send("stop")
    proc.join(30)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)


# ----------------------------------------------------------------------------- HTTP


def _get(url: str, headers: dict[str, str]) -> tuple[int, float]:
    request = urllib.request.Request(url, headers=headers)
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return len(body), time.perf_counter() - t0


def http_sizes(base: str, auth: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for path in (*FILES, *APIS):
        headers = dict(auth) if path.startswith("/api") else {}
        raw, took = _get(base + path, headers)
        zipped, _ = _get(base + path, {**headers, "Accept-Encoding": "gzip"})
        rows.append({"path": path, "bytes": raw, "gzip_bytes": zipped, "ms": took * 1000})
    return rows


def browser_first_load(base: str, principal: str, token: str, n: int) -> dict[str, Any]:
    """Log in once, then time a fresh load of the workers view until all rows show."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with scratch_dir("xcloud-bench-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless", "--no-sandbox", "--disable-gpu",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                     "--window-size=1400,1000"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options,
                                  service=Service(executable_path="/usr/bin/chromedriver"))
        try:
            driver.set_script_timeout(60)
            driver.get(base + "/")
            _wait(lambda: driver.execute_script(
                "return !document.querySelector('#login').hidden"), 30)
            driver.execute_async_script(
                "const done = arguments[2];"
                "fetch('/api/login', {method: 'POST', headers: {'Content-Type': "
                "'application/json'}, body: JSON.stringify({principal: arguments[0], "
                "token: arguments[1]})}).then(r => done(r.status));", principal, token)
            driver.execute_script("window.open('about:blank')")
            driver.switch_to.window(driver.window_handles[-1])
            driver.execute_cdp_cmd("Network.clearBrowserCache", {})  # a cold first load
            driver.get(base + "/#/workers")
            # Polled inside the page (every frame), so WebDriver round trips do not count.
            shown_ms = driver.execute_async_script(
                "const [n, done] = arguments;"
                "const look = () => document.querySelectorAll('tr[data-worker]').length >= n"
                " ? done(performance.now()) : requestAnimationFrame(look); look();", n)
            entries = driver.execute_script(
                "const nav = performance.getEntriesByType('navigation')[0];"
                "return [[nav.name, nav.transferSize, 0, nav.responseEnd], "
                "...performance.getEntriesByType('resource')"
                ".filter(e => !e.name.endsWith('/api/events'))"
                ".map(e => [e.name, e.transferSize, e.startTime, e.responseEnd])]")
            return {"ms": float(shown_ms), "bytes": int(sum(e[1] for e in entries)),
                    "requests": len(entries),
                    "timeline": [(e[0].removeprefix(base), int(e[1]), round(e[2]),
                                  round(e[3])) for e in entries]}
        finally:
            driver.quit()


def _wait(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the page did not get there in time")
        time.sleep(0.05)


class EventStream(threading.Thread):
    """One live page's update stream (GET /api/events), read until stopped."""

    def __init__(self, base: str, auth: dict[str, str]) -> None:
        super().__init__(daemon=True, name="bench-sse")
        host, _, port = base.removeprefix("http://").partition(":")
        self.address = (host, int(port))
        self.auth = auth
        self.bytes = 0
        self.ticks = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        with socket.create_connection(self.address, timeout=5) as sock:
            headers = "".join(f"{k}: {v}\r\n" for k, v in self.auth.items())
            sock.sendall(f"GET /api/events HTTP/1.1\r\nHost: {self.address[0]}\r\n"
                         f"{headers}\r\n".encode())
            while not self.stop_event.is_set():
                with contextlib.suppress(TimeoutError):
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    self.bytes += len(chunk)
                    self.ticks += chunk.count(b"event: tick")


def coordinator_cpu(pid: int, seconds: float) -> float:
    proc = psutil.Process(pid)
    c0 = sum(proc.cpu_times()[:2])
    t0 = time.monotonic()
    time.sleep(seconds)
    return 100.0 * (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - t0)


def live_grid(workers: int, window_s: float, browser: bool) -> dict[str, Any]:
    from coordinator.bootstrap import issue_token
    from coordinator.store import Store

    root = unique_root("dash")
    result: dict[str, Any] = {"workers": workers, "window_s": window_s}
    with scratch_dir() as work:
        db_url = f"sqlite:///{work / 'dashboard.db'}"
        # in the coordinator's store, as an operator bootstraps a grid (the coordinator
        # checks every request's sender there)
        ids = registered(db_url, root, ("coordinator", "coordinator"), ("sim", "coordinator"))
        with Store.open(db_url) as store:
            admin_token = issue_token(store, "admin", "admin", "bench")
        broker = start_broker("mosquitto", ids, root, work)
        coord, coord_conn = _spawn(_coordinator_main, broker.url, root, ids["coordinator"],
                                   db_url, str(work / "home"))
        hb = None
        try:
            pid, base = coord_conn.recv()
            auth = {"Authorization": f"Bearer admin:{admin_token}"}
            publish_caps(broker.url, ids["sim"], root, [f"sim{i:05d}" for i in range(workers)],
                         HEARTBEAT_S)
            hb, hb_conn = _spawn(_heartbeats_main, broker.url, ids["sim"], root, workers)
            _wait(lambda: _online(base, auth) >= workers, 120)
            time.sleep(HEARTBEAT_S * 2)  # every worker has a heartbeat with metrics
            result["http"] = http_sizes(base, auth)
            if browser:
                result["browser"] = browser_first_load(base, "admin", admin_token, workers)
            result["cpu_idle_pct"] = coordinator_cpu(pid, window_s)
            streams = [EventStream(base, auth) for _ in range(WATCHERS)]
            for stream in streams:
                stream.start()
            time.sleep(2)
            before = [s.bytes for s in streams]
            result["cpu_watched_pct"] = coordinator_cpu(pid, window_s)
            result["stream_bytes_per_s"] = sum(
                s.bytes - b for s, b in zip(streams, before, strict=True)) / WATCHERS / window_s
            result["ticks"] = min(s.ticks for s in streams)
            for stream in streams:
                stream.stop_event.set()
            for stream in streams:
                stream.join(10)
        finally:
            if hb is not None:
                _stop(hb, hb_conn)
            _stop(coord, coord_conn)
            broker.stop()
    return result


def _online(base: str, auth: dict[str, str]) -> int:
    request = urllib.request.Request(base + "/api/overview", headers=auth)
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(json.loads(response.read())["grid"].get("workers_online", 0))


# ----------------------------------------------------------------------------- a month


ERAS = (  # (from seconds before the end, to, one sample every ...)
    (35 * 86400, 8 * 86400, 3600),
    (8 * 86400, 86400, 900),
    (86400, 3600, 60),
    (3600, 0, 5),
)


def simulated_month(workers: int, days: int = 30) -> dict[str, Any]:
    from broker.config import MonitoringConfig
    from coordinator.monitoring.rollup import Rollup
    from coordinator.monitoring.tiers import parse_tiers, rows_per_worker
    from coordinator.store import Store

    config = MonitoringConfig()
    tiers = parse_tiers(config.tiers)
    end = 1_800_000_000 // 86400 * 86400
    start = end - days * 86400
    t0 = time.monotonic()
    with scratch_dir() as work:
        path = work / "month.db"
        with Store.open(f"sqlite:///{path}") as store:
            for i in range(workers):
                store.upsert_worker_caps(f"sim{i:05d}", {"wid": f"sim{i:05d}", "slots": 2},
                                         start)
            rollup = Rollup(store, raw_retention_s=config.raw_retention_s, tiers=tiers,
                            batch=250_000, fold_rows=2_000_000, fold_steps=64,
                            delete_chunk=100_000, delete_budget=5_000_000)
            written = 0
            hour = start
            while hour < end:
                step = next(every for since, until, every in ERAS
                            if end - since <= hour < end - until)
                _write_hour(store, workers, hour, step)
                written += workers * (3600 // step)
                _grid_samples(store, hour, max(step, 10), workers)
                while rollup.run(hour + 3600).behind:
                    pass
                hour += 3600
            rollup.run(end + 60)
            sizes = _sqlite_sizes(path)
            rows = {s.table: s.rows for s in store.metrics_table_sizes()}
    bound = rows_per_worker(config.raw_retention_s, HEARTBEAT_S, tiers)
    return {"workers": workers, "days": days, "samples_written": written,
            "seconds": time.monotonic() - t0, "rows": rows, "bytes": sizes,
            "bound_rows_per_worker": bound, "tiers": config.tiers,
            "raw_retention_s": config.raw_retention_s}


def _write_hour(store: Any, workers: int, hour: int, step: int) -> None:
    sql = ("INSERT INTO xc_worker_sample (worker_id, ts, cpu_percent, load1, mem_used_bytes, "
           "mem_available_bytes, disk_free_bytes, net_sent_bytes, net_recv_bytes, running) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
    rows = []
    for ts in range(hour, hour + 3600, step):
        for i in range(workers):
            rows.append((f"sim{i:05d}", float(ts + i % step), float((ts // step + i) % 100),
                         0.42, 3_000_000_000 + i, 4_000_000_000, 50_000_000_000,
                         ts * 1000 + i, ts * 4000 + i, i % 3))
    with store.db.connection_context(), store.db.atomic():
        cursor = store.db.cursor()
        cursor.executemany(sql, rows)
        cursor.close()


def _grid_samples(store: Any, hour: int, step: int, workers: int) -> None:
    from coordinator.monitoring.grid_series import SERIES
    from coordinator.monitoring.tiers import GRID_RES

    rows = [(name, GRID_RES, ts - ts % GRID_RES, 1, float(workers), float(workers),
             float(workers)) for ts in range(hour, hour + 3600, step) for name in SERIES]
    store.merge_grid_samples(rows)


def _sqlite_sizes(path: Path) -> dict[str, int]:
    """Bytes per table, its indexes included (SQLite's dbstat), and the whole file."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        pages = dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"))
        indexes = dict(conn.execute("SELECT name, tbl_name FROM sqlite_master "
                                    "WHERE type = 'index'"))
    sizes: dict[str, int] = {}
    for name, size in pages.items():
        table = indexes.get(name, name)
        sizes[table] = sizes.get(table, 0) + int(size)
    sizes["(file)"] = path.stat().st_size
    return sizes


# ----------------------------------------------------------------------------- report


def run(quick: bool, workers: int | None, month_workers: int | None, no_browser: bool,
        skip_month: bool, skip_live: bool) -> dict[str, Any]:
    n = workers or (200 if quick else 1000)
    browser = not no_browser and Path("/usr/bin/chromium").exists()
    result: dict[str, Any] = {"machine": machine()}
    if not skip_live:
        result["live"] = live_grid(n, 10.0 if quick else 30.0, browser)
    if not skip_month:
        result["month"] = simulated_month(month_workers or (500 if quick else 5000))
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["## Dashboard", "", machine_line(result["machine"]), ""]
    if "live" in result:
        lines += _live_markdown(result["live"])
    if "month" in result:
        lines += _month_markdown(result["month"])
    return "\n".join(lines)


def _live_markdown(live: dict[str, Any]) -> list[str]:
    lines = [f"### Live grid: {live['workers']:,} simulated workers, heartbeat "
             f"{HEARTBEAT_S:g} s", ""]
    if "browser" in live:
        b = live["browser"]
        lines += [f"First load of the workers view in headless Chromium (navigation start "
                  f"→ all {live['workers']:,} rows shown): **{b['ms']:.0f} ms**, "
                  f"**{b['bytes'] / 1024:.0f} KiB** transferred in {b['requests']} requests "
                  "(cold cache).", "",
                  md_table(["request", "bytes", "start (ms)", "end (ms)"],
                           [[t[0] or "/", fmt(t[1]), fmt(t[2]), fmt(t[3])]
                            for t in b["timeline"]]), ""]
    lines += [md_table(["what", "bytes", "gzip bytes", "time (ms, raw)"],
                       [[r["path"], fmt(r["bytes"]), fmt(r["gzip_bytes"]), fmt(r["ms"], 1)]
                        for r in live["http"]]), ""]
    lines += [md_table(
        ["coordinator CPU (% of one core)", "no page open", f"{WATCHERS} live pages"],
        [["over " + fmt(live["window_s"]) + " s", fmt(live["cpu_idle_pct"], 1),
          fmt(live["cpu_watched_pct"], 1)]]), "",
        f"Each live page received {live['stream_bytes_per_s'] / 1024:.1f} KiB/s "
        f"({live['ticks']} ticks).", ""]
    return lines


def _month_markdown(m: dict[str, Any]) -> list[str]:
    lines = [f"### Metrics tables after {m['days']} simulated days of "
             f"{m['workers']:,} workers at a {HEARTBEAT_S:g} s heartbeat", "",
             f"Tiers {', '.join(m['tiers'])}, raw samples kept "
             f"{m['raw_retention_s'] / 3600:g} h; bound "
             f"{m['bound_rows_per_worker']:,} rows per worker. "
             f"{m['samples_written']:,} samples written and rolled up in "
             f"{m['seconds']:.0f} s.", ""]
    rows = [[t, fmt(r), "–" if t == "xc_grid_metric" else fmt(r / m["workers"], 1),
             fmt(m["bytes"].get(t, 0) / 2**20, 1)] for t, r in m["rows"].items()]
    rows.append(["(SQLite file)", "", "", fmt(m["bytes"]["(file)"] / 2**20, 1)])
    lines += [md_table(["table", "rows", "rows per worker", "MiB (with indexes)"], rows)]
    return lines


def main() -> int:
    def add_args(parser: Any) -> None:
        parser.add_argument("--workers", type=int, help="simulated live workers")
        parser.add_argument("--month-workers", type=int, help="workers of the simulated month")
        parser.add_argument("--no-browser", action="store_true", help="HTTP numbers only")
        parser.add_argument("--skip-month", action="store_true", help="live part only")
        parser.add_argument("--skip-live", action="store_true", help="month part only")

    return cli("dashboard", __doc__.splitlines()[0], run, markdown, add_args)


if __name__ == "__main__":
    raise SystemExit(main())

