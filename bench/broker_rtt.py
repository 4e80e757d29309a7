"""Broker round trip and throughput: amqtt (our EmbeddedBroker) beside Mosquitto.

Two layers, so the table separates the broker's cost from the bus's:

1. raw paho-mqtt clients (no JSON, no validation): round trip through an echoing
   client, one-way throughput of 100 B messages at QoS 0 and 1, and MB/s with
   256 KiB payloads;
2. ``broker.bus.Bus``: ``request()``/``reply()`` of ``ping``/``pong`` (encode,
   JSON-Schema validation and decode on both sides, lanes, correlation), and one-way
   throughput of validated ``ping`` envelopes (~90 B) into a ``Bus.subscribe`` handler.

Every broker runs in its own process (amqtt: ``EmbeddedBroker`` in a spawned process),
every throughput publisher and subscriber in its own process; the round-trip requester
is the benchmark process and the echo a separate process. Both brokers authenticate
the same principals and enforce the same ACL (Mosquitto through the exported files).

    python -m bench.broker_rtt [--quick] [--brokers mosquitto,amqtt]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.brokers import Broker, start_broker
from bench.cpu_load import CpuMeter, LoadMonitor
from bench.identities import Identity, identities
from bench.machine import machine, machine_line
from bench.paho_clients import paho_close, paho_connect
from bench.percentiles import latency_ms
from bench.processes import SPAWN, die_with_parent, quiet_logging
from bench.report import fmt, md_table, ratio
from bench.scratch import scratch_dir, unique_root
from broker.bus import Lane

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

ROLES = (("bench-a", "coordinator"), ("bench-b", "coordinator"),
         ("bench-coord", "coordinator"), ("bench-client", "client"))
SMALL = 100
LARGE = 256 * 1024
IDLE_S = 5.0  # a subscriber gives up after this long without a message

FULL = {"rtt": 1000, "warmup": 100, "small": 20_000, "bus": 10_000, "large": 300}
QUICK = {"rtt": 500, "warmup": 100, "small": 10_000, "bus": 5_000, "large": 100}


# ----------------------------------------------------------------------------- children


def _bus_for(url: str, ident: Identity, root: str, inbox: str | None = None) -> Any:
    from broker.bus import Bus
    from broker.config import BusConfig

    cfg = BusConfig(url=url, principal=ident.id, token=ident.token, root=root)
    return Bus(cfg, inbox=inbox)


def _raw_echo(conn: Any, url: str, ident: Identity, root: str, qos: int) -> None:
    """Echo every message on ``{root}/bench/ping`` to ``{root}/bench/pong``."""
    die_with_parent()
    quiet_logging()
    pong = f"{root}/bench/pong"

    def on_message(c: Any, _userdata: Any, msg: Any) -> None:
        c.publish(pong, msg.payload, qos)

    client = paho_connect(url, ident, on_message=on_message,
                          subscribe=[(f"{root}/bench/ping", qos)])
    conn.send("ready")
    with contextlib.suppress(EOFError, OSError):
        conn.recv()
    paho_close(client)


def _bus_echo(conn: Any, url: str, ident: Identity, root: str) -> None:
    """A coordinator-like inbox answering ``ping`` with ``pong`` on the requests lane."""
    die_with_parent()
    quiet_logging()
    from schemas.messages import Pong
    from schemas.topics import Topics

    bus = _bus_for(url, ident, root, inbox=Topics(root).coord_inbox)
    bus.on_inbox("ping", lambda inc: bus.reply(inc, Pong(component="bench-echo")),
                 lane=Lane.REQUESTS)
    bus.start()
    conn.send("ready")
    with contextlib.suppress(EOFError, OSError):
        conn.recv()
    bus.stop()


def _subscriber(conn: Any, url: str, ident: Identity, root: str, topic: str, qos: int,
                expected: int, use_bus: bool) -> None:
    """Count messages on ``topic`` (raw paho callback, or validated Bus handler)."""
    die_with_parent()
    quiet_logging()
    state = {"n": 0, "bytes": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()

    def seen(size: int) -> None:
        now = time.monotonic()
        if state["n"] == 0:
            state["first"] = now
        state["n"] += 1
        state["bytes"] += size
        state["last"] = now
        if state["n"] >= expected:
            done.set()

    if use_bus:
        bus = _bus_for(url, ident, root)
        bus.subscribe(topic, lambda _inc: seen(1), qos=qos, lane=Lane.DEFAULT)
        bus.start()
        time.sleep(0.5)  # the Bus does not expose SUBACK; give it time to land
        client = None
    else:
        bus = None
        client = paho_connect(url, ident, on_message=lambda _c, _u, m: seen(len(m.payload)),
                              subscribe=[(topic, qos)])
    conn.send("ready")
    while not done.wait(0.05):
        if state["n"] and time.monotonic() - state["last"] > IDLE_S:
            break
        if not state["n"] and conn.poll(0):  # publisher failed: parent says stop
            conn.recv()
            break
    conn.send(dict(state))
    if bus is not None:
        bus.stop()
    if client is not None:
        paho_close(client)


def _publisher(conn: Any, url: str, ident: Identity, root: str, topic: str, qos: int,
               n: int, size: int, use_bus: bool) -> None:
    """Publish ``n`` messages as fast as possible once told to go."""
    die_with_parent()
    quiet_logging()
    publish: Callable[[], mqtt.MQTTMessageInfo]
    if use_bus:
        from schemas.messages import Ping

        bus = _bus_for(url, ident, root)
        bus.start()
        publish = lambda: bus.publish(topic, Ping(), qos=qos)  # noqa: E731
        client = None
    else:
        bus = None
        client = paho_connect(url, ident)
        payload = b"x" * size
        publish = lambda: client.publish(topic, payload, qos)  # noqa: E731
    conn.send("ready")
    conn.recv()  # go
    t0 = time.monotonic()
    info = None
    for _ in range(n):
        info = publish()
    sent = time.monotonic()
    if info is not None:
        info.wait_for_publish(120)
    t1 = time.monotonic()
    conn.send({"t_start": t0, "t_sent": sent, "t_done": t1})
    conn.recv()  # stop
    if bus is not None:
        bus.stop()
    if client is not None:
        paho_close(client)


# ----------------------------------------------------------------------------- helpers


class _Child:
    """A spawned child with a pipe; ``stop()`` always reaps it."""

    def __init__(self, target: Any, *args: Any) -> None:
        self.conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()

    def recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.proc.name}: no answer within {timeout:g} s")
        return self.conn.recv()

    def send(self, value: Any) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(value)

    def stop(self) -> None:
        self.send("stop")
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


def raw_rtt(url: str, ident: Identity, root: str, qos: int, n: int, warmup: int
            ) -> dict[str, float]:
    """Round trips through ``_raw_echo``; this process drives paho's loop itself."""
    echo = _Child(_raw_echo, url, ident, root, qos)
    try:
        echo.recv(30)
        got: list[Any] = []
        client = paho_connect(url, ident, threaded=False,
                              on_message=lambda _c, _u, m: got.append(m),
                              subscribe=[(f"{root}/bench/pong", qos)])
        ping = f"{root}/bench/ping"
        samples: list[float] = []
        try:
            for i in range(warmup + n):
                payload = f"{i:08d}".encode().ljust(SMALL, b".")
                t0 = time.perf_counter()
                client.publish(ping, payload, qos)
                deadline = t0 + 5.0
                while not got:
                    client.loop(0.01)
                    if time.perf_counter() > deadline:
                        raise TimeoutError("echo did not answer within 5 s")
                dt = time.perf_counter() - t0
                got.clear()
                if i >= warmup:
                    samples.append(dt)
        finally:
            paho_close(client, threaded=False)
        return latency_ms(samples)
    finally:
        echo.stop()


def bus_rtt(url: str, ids: dict[str, Identity], root: str, n: int, warmup: int
            ) -> dict[str, float]:
    """``Bus.request(ping)`` from a client principal to a coordinator-like inbox."""
    from broker.bus import RequestTimeout
    from schemas.messages import Ping
    from schemas.topics import Topics

    topics = Topics(root)
    echo = _Child(_bus_echo, url, ids["bench-coord"], root)
    try:
        echo.recv(30)
        client = ids["bench-client"]
        bus = _bus_for(url, client, root, inbox=topics.client_inbox(client.id))
        bus.start()
        try:
            deadline = time.monotonic() + 15
            while True:  # until the echo's subscription is in place
                try:
                    bus.request(topics.coord_inbox, Ping(), timeout=1.0)
                    break
                except RequestTimeout:
                    if time.monotonic() > deadline:
                        raise
            samples: list[float] = []
            for i in range(warmup + n):
                t0 = time.perf_counter()
                bus.request(topics.coord_inbox, Ping(), timeout=5.0)
                if i >= warmup:
                    samples.append(time.perf_counter() - t0)
        finally:
            bus.stop()
        return latency_ms(samples)
    finally:
        echo.stop()


def throughput(broker: Broker, ids: dict[str, Identity], root: str, *, qos: int, n: int,
               size: int, use_bus: bool) -> dict[str, Any]:
    """One publisher process → broker → one subscriber process; rate seen by the subscriber.

    Rate = messages received / (last received − publisher's first publish), both on the
    system-wide monotonic clock.
    """
    topic = f"{root}/bench/{'bus' if use_bus else 'raw'}"
    sub = _Child(_subscriber, broker.url, ids["bench-b"], root, topic, qos, n, use_bus)
    pub = None
    try:
        sub.recv(30)
        pub = _Child(_publisher, broker.url, ids["bench-a"], root, topic, qos, n, size,
                     use_bus)
        pub.recv(30)
        meter = CpuMeter(broker.pid).start()
        pub.send("go")
        p = pub.recv(300)
        s = sub.recv(300)
        cpu = meter.stop()
    finally:
        if pub is not None:
            pub.stop()
        sub.stop()
    elapsed = max(1e-9, s["last"] - p["t_start"]) if s["n"] else float("nan")
    rate = s["n"] / elapsed if s["n"] else 0.0
    return {
        "qos": qos,
        "size": size,
        "sent": n,
        "received": s["n"],
        "msg_s": rate,
        "mb_s": (s["bytes"] / elapsed / 1e6) if s["n"] and not use_bus else None,
        "publish_s": p["t_sent"] - p["t_start"],
        "elapsed_s": elapsed,
        "broker_cpu_pct": cpu["cpu_pct"],
        "broker_cpu_us_per_msg": 1e6 * cpu["cpu_s"] / max(1, s["n"]),
    }


# ----------------------------------------------------------------------------- run


def run_broker(kind: str, sizes: dict[str, int], workdir: Path) -> dict[str, Any]:
    root = unique_root("rtt")
    ids = identities(*ROLES)
    broker = start_broker(kind, ids, root, workdir)
    load = LoadMonitor().start()
    try:
        out: dict[str, Any] = {"broker": kind}
        n, w = sizes["rtt"], sizes["warmup"]
        out["rtt_raw_q0"] = raw_rtt(broker.url, ids["bench-a"], root, 0, n, w)
        out["rtt_raw_q1"] = raw_rtt(broker.url, ids["bench-a"], root, 1, n, w)
        out["rtt_bus"] = bus_rtt(broker.url, ids, root, n, w)
        out["tput_raw_q0"] = throughput(broker, ids, root, qos=0, n=sizes["small"],
                                        size=SMALL, use_bus=False)
        out["tput_raw_q1"] = throughput(broker, ids, root, qos=1, n=sizes["small"],
                                        size=SMALL, use_bus=False)
        out["tput_bus_q0"] = throughput(broker, ids, root, qos=0, n=sizes["bus"],
                                        size=0, use_bus=True)
        out["tput_bus_q1"] = throughput(broker, ids, root, qos=1, n=sizes["bus"],
                                        size=0, use_bus=True)
        out["tput_large_q0"] = throughput(broker, ids, root, qos=0, n=sizes["large"],
                                          size=LARGE, use_bus=False)
        out["others_pct"] = load.stop()["others_pct"]
        return out
    finally:
        broker.stop()


def run(quick: bool = False, brokers: str = "mosquitto,amqtt") -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    kinds = [b.strip() for b in brokers.split(",") if b.strip()]
    started = time.monotonic()
    results: dict[str, Any] = {}
    with scratch_dir() as workdir:
        for kind in kinds:
            print(f"broker_rtt: {kind} ...", file=sys.stderr, flush=True)
            results[kind] = run_broker(kind, sizes, workdir)
    return {"benchmark": "broker_rtt", "quick": quick, "sizes": sizes, "results": results,
            "machine": machine(), "elapsed_s": round(time.monotonic() - started, 1)}


# ----------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    res = result["results"]
    a, m = res.get("amqtt", {}), res.get("mosquitto", {})

    def lat(key: str, pct: str) -> tuple[float | None, float | None]:
        return (a.get(key, {}).get(pct), m.get(key, {}).get(pct))

    def tput(key: str, field: str = "msg_s") -> tuple[float | None, float | None]:
        return (a.get(key, {}).get(field), m.get(key, {}).get(field))

    rows: list[list[str]] = []
    for label, key in (("round trip, raw paho, QoS 0", "rtt_raw_q0"),
                       ("round trip, raw paho, QoS 1", "rtt_raw_q1"),
                       ("round trip, Bus request/reply (QoS 1, validated)", "rtt_bus")):
        for pct in ("p50", "p99"):
            va, vm = lat(key, pct)
            rows.append([f"{label}, {pct} (ms)", fmt(va, 3), fmt(vm, 3), ratio(va, vm)])
    for label, key in (("throughput, raw paho, 100 B, QoS 0 (msg/s)", "tput_raw_q0"),
                       ("throughput, raw paho, 100 B, QoS 1 (msg/s)", "tput_raw_q1"),
                       ("throughput, Bus ping (~90 B, validated), QoS 0 (msg/s)",
                        "tput_bus_q0"),
                       ("throughput, Bus ping (~90 B, validated), QoS 1 (msg/s)",
                        "tput_bus_q1")):
        va, vm = tput(key)
        rows.append([label, fmt(va), fmt(vm), ratio(va, vm)])
    va, vm = tput("tput_large_q0", "mb_s")
    rows.append(["throughput, raw paho, 256 KiB, QoS 0 (MB/s)", fmt(va, 1), fmt(vm, 1),
                 ratio(va, vm)])
    table = md_table(["measure", "amqtt (EmbeddedBroker)", "Mosquitto", "amqtt / Mosquitto"],
                     rows)
    detail = []
    for key in ("tput_raw_q0", "tput_raw_q1", "tput_bus_q0", "tput_bus_q1", "tput_large_q0"):
        for kind, r in (("amqtt", a), ("mosquitto", m)):
            t = r.get(key)
            if t:
                detail.append([f"{key} {kind}", f"{t['received']:,}/{t['sent']:,}",
                               fmt(t["publish_s"], 2), fmt(t["elapsed_s"], 2),
                               fmt(t["broker_cpu_pct"]),
                               fmt(t.get("broker_cpu_us_per_msg"), 1)])
    detail_table = md_table(["run", "received/sent", "publish loop (s)", "to last received (s)",
                             "broker CPU %", "broker CPU µs/msg"], detail)
    load = ", ".join(f"{k} {fmt(v.get('others_pct'))} %" for k, v in res.items())
    return "\n".join([
        f"### broker_rtt ({'quick' if result['quick'] else 'full'})",
        "",
        f"Measured {machine_line(result['machine'])}.",
        "",
        table,
        "",
        detail_table,
        "",
        f"Other processes' share of the machine during each broker's runs: {load}.",
    ])


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--brokers", default="mosquitto,amqtt",
                        help="comma-separated: mosquitto, amqtt")


def main(argv: list[str] | None = None) -> int:
    from bench.report import cli

    return cli("broker_rtt", __doc__.splitlines()[0], run, markdown, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
