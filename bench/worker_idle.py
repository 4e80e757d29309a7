"""Idle worker footprint: CPU and memory of a real worker agent doing nothing but
heartbeating.

Method: ``python -m client.cli worker`` (the real entry point, process executor,
heartbeat 5 s) runs as its own worker principal against a Mosquitto broker on a free
port (no coordinator: an idle worker's work is the same with or without one). Once its
first heartbeat arrives (that time is the start-up time), the benchmark waits 1 s and
then measures for 60 s (30 s in --quick): CPU seconds of the process (and any
children), summed over its threads from /proc/<pid>/task/*/schedstat (nanoseconds;
psutil's 10 ms ticks are too coarse for an idle process), divided by the wall time
(100 % = one core), and its RSS (and USS) sampled every second. Heartbeats seen by an
admin subscriber are counted.
Targets: < 1 % CPU and < 50 MB RSS.

    python -m bench.worker_idle [--quick] [--seconds N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.brokers import MosquittoBroker
from bench.identities import identities
from bench.machine import machine, machine_line
from bench.paho_clients import paho_close, paho_connect
from bench.processes import die_with_parent
from bench.report import fmt, md_table
from bench.scratch import scratch_dir, unique_root

REPO = Path(__file__).resolve().parent.parent
HEARTBEAT_S = 5.0
TARGET_CPU_PCT = 1.0
TARGET_RSS_MB = 50.0


def _schedstat_cpu(pid: int) -> float | None:
    """CPU seconds of all threads of ``pid`` from /proc/<pid>/task/*/schedstat (ns
    resolution; psutil's cpu_times counts 10 ms clock ticks, too coarse here)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
    except OSError:
        return None
    return total / 1e9


def _tree_cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        precise = _schedstat_cpu(p.pid)
        if precise is not None:
            total += precise
            continue
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def run(quick: bool = False, seconds: float | None = None) -> dict[str, Any]:
    duration = seconds or (30.0 if quick else 60.0)
    root = unique_root("idle")
    wid = "idle-worker"
    ids = identities((wid, "worker"), ("watcher", "admin"))
    beats: list[float] = []
    started = time.monotonic()
    with scratch_dir() as workdir:
        broker = MosquittoBroker(ids, root, workdir).start()
        watcher = None
        proc: subprocess.Popen[bytes] | None = None
        try:
            watcher = paho_connect(broker.url, ids["watcher"],
                                   on_message=lambda _c, _u, _m: beats.append(time.monotonic()),
                                   subscribe=[(f"{root}/worker/{wid}/heartbeat", 0)])
            env = dict(os.environ, XCLOUD_HOME=str(workdir / "home"),
                       XCLOUD_BUS_PRINCIPAL=wid, XCLOUD_BUS_TOKEN=ids[wid].token,
                       PYTHONPATH=str(REPO))
            cmd = [sys.executable, "-m", "client.cli", "worker", "--broker", broker.url,
                   "--root", root, "--state-dir", str(workdir / "state"), "--name", wid,
                   "--heartbeat", str(HEARTBEAT_S), "--executor", "process"]
            log_path = workdir / "worker.log"
            t0 = time.monotonic()
            with open(log_path, "wb") as log_file:
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                        stdout=log_file, stderr=subprocess.STDOUT,
                                        preexec_fn=die_with_parent)
            ps = psutil.Process(proc.pid)
            deadline = t0 + 60
            while not beats:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("worker did not heartbeat: "
                                       + log_path.read_text(errors="replace")[-2000:])
                time.sleep(0.01)
            startup_s = beats[0] - t0
            startup_cpu = _tree_cpu(ps)
            startup_rss = ps.memory_info().rss
            time.sleep(1.0)
            n0 = len(beats)
            c0, w0 = _tree_cpu(ps), time.monotonic()
            rss: list[int] = []
            uss: list[int] = []
            end = w0 + duration
            while time.monotonic() < end:
                mem = ps.memory_full_info()
                rss.append(mem.rss)
                uss.append(mem.uss)
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            c1, w1 = _tree_cpu(ps), time.monotonic()
            threads = ps.num_threads()
            children = len(ps.children(recursive=True))
            heartbeats = len(beats) - n0
        finally:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if watcher is not None:
                paho_close(watcher)
            broker.stop()
    wall = w1 - w0
    return {
        "benchmark": "worker_idle", "quick": quick, "seconds": wall,
        "heartbeat_s": HEARTBEAT_S, "heartbeats": heartbeats,
        "cpu_s": c1 - c0, "cpu_pct": 100.0 * (c1 - c0) / wall,
        "rss_max_mb": max(rss) / 1e6, "rss_end_mb": rss[-1] / 1e6,
        "uss_max_mb": max(uss) / 1e6, "threads": threads, "children": children,
        "startup_s": startup_s, "startup_cpu_s": startup_cpu,
        "startup_rss_mb": startup_rss / 1e6,
        "targets": {"cpu_pct": TARGET_CPU_PCT, "rss_mb": TARGET_RSS_MB},
        "machine": machine(), "elapsed_s": round(time.monotonic() - started, 1),
    }


def markdown(r: dict[str, Any]) -> str:
    ok_cpu = r["cpu_pct"] < TARGET_CPU_PCT
    ok_rss = r["rss_max_mb"] < TARGET_RSS_MB
    rows = [
        ["CPU (% of one core)", fmt(r["cpu_pct"], 3), f"< {TARGET_CPU_PCT:g} %",
         "met" if ok_cpu else "MISSED"],
        ["RSS, max (MB)", fmt(r["rss_max_mb"], 1), f"< {TARGET_RSS_MB:g} MB",
         "met" if ok_rss else "MISSED"],
        ["USS, max (MB)", fmt(r["uss_max_mb"], 1), "", ""],
        ["CPU seconds over the window", fmt(r["cpu_s"], 3), "", ""],
        ["heartbeats seen", str(r["heartbeats"]), f"every {r['heartbeat_s']:g} s", ""],
        ["threads / child processes", f"{r['threads']} / {r['children']}", "", ""],
        ["start-up: launch → first heartbeat (s)", fmt(r["startup_s"], 2), "", ""],
        ["start-up: CPU seconds until then", fmt(r["startup_cpu_s"], 2), "", ""],
    ]
    return "\n".join([
        f"### worker_idle ({'quick' if r['quick'] else 'full'}, {r['seconds']:.0f} s window)",
        "",
        f"Measured {machine_line(r['machine'])}.",
        "",
        md_table(["measure", "value", "target", ""], rows),
    ])


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, help="measurement window (default 60; 30 quick)")


def main(argv: list[str] | None = None) -> int:
    from bench.report import cli

    return cli("worker_idle", "Idle worker CPU and memory.", run, markdown, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
