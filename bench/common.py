"""Shared helpers for the benchmarks.

- brokers on free ports with xcloud authentication and ACL: Mosquitto (a child process,
  with a password and ACL file exported by ``broker.mosquitto``) and the embedded amqtt
  broker (``broker.embedded.EmbeddedBroker`` in its own spawned process, so its event
  loop never shares a GIL with the clients being measured);
- databases: a SQLite file in a scratch directory, or a fresh MariaDB database that is
  dropped afterwards;
- a coordinator in its own process, with a small command pipe for measurements;
- percentiles, machine description, CPU meters, markdown tables, the CLI wrapper.

Every process started here is stopped by the code that started it (and, as a backstop,
asks the kernel to SIGTERM it when its parent dies). All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from broker.acl import Principal, Role
from broker.credentials import hash_token, new_token, verify_token
from broker.mosquitto import write_mosquitto_files

log = logging.getLogger("bench")

LOCALHOST = "127.0.0.1"
MARIADB_SERVER = os.environ.get("XCLOUD_BENCH_MARIADB", "mysql://root@127.0.0.1:3306")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SPAWN = mp.get_context("spawn")
PR_SET_PDEATHSIG = 1


# ----------------------------------------------------------------------------- basics


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def die_with_parent() -> None:
    """Linux: ask the kernel to SIGTERM this process when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.01,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy (returned) or raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)


def quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("amqtt", "transitions", "websockets"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def scratch_dir(prefix: str = "xcloud-bench-") -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def unique_root(prefix: str = "bench") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ----------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) with linear interpolation (numpy's default)."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    rank = (len(data) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(data) - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (rank - lo))


def latency_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """Summary of latencies given in seconds, reported in milliseconds."""
    ms = [s * 1000.0 for s in samples_s]
    return {
        "n": len(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else math.nan,
        "mean": sum(ms) / len(ms) if ms else math.nan,
    }


# ----------------------------------------------------------------------------- machine


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def mariadb_version() -> str:
    try:
        conn = mariadb_connect()
    except Exception:
        return "unavailable"
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            row = cur.fetchone()
            return str(row[0]) if row else "?"
    finally:
        conn.close()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "date": datetime.date.today().isoformat(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": _first_line([mosquitto_binary(), "-h"]).replace("mosquitto version ", ""),
        "mariadb": mariadb_version(),
        "amqtt": _version("amqtt"),
        "paho-mqtt": _version("paho-mqtt"),
        "peewee": _version("peewee"),
        "PyMySQL": _version("PyMySQL"),
    }


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['date']}, {m['nproc']} × {m['cpu_model']} ({m['memory_gib']} GiB), "
            f"Linux {m['kernel']}, Python {m['python']}, Mosquitto {m['mosquitto']}, "
            f"amqtt {m['amqtt']}, paho-mqtt {m['paho-mqtt']}, MariaDB {m['mariadb']}")


# ----------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class Identity:
    """A principal the benchmark connects as, with its plain token."""

    id: str
    role: str
    token: str = field(repr=False, default_factory=new_token)

    @property
    def principal(self) -> Principal:
        return Principal(self.id, Role(self.role))


def identities(*pairs: tuple[str, str]) -> dict[str, Identity]:
    """``{"alice": Identity("alice", "client", <token>)}`` from ``("alice", "client")``."""
    return {pid: Identity(pid, role) for pid, role in pairs}


# ----------------------------------------------------------------------------- brokers


def mosquitto_binary() -> str:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which(os.environ.get("XCLOUD_MOSQUITTO", "mosquitto"), path=search) or (
        "/usr/sbin/mosquitto")


class Broker:
    """A running broker: ``url``, ``pid`` (for CPU accounting) and ``stop()``."""

    kind = "?"
    url = ""

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def start(self) -> Broker:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MosquittoBroker(Broker):
    """Mosquitto on a free port, authenticating our principals with the exported files.

    ``max_queued_messages 0`` (no per-client queue limit) unless told otherwise: with the
    default of 1000, Mosquitto silently drops QoS 0 messages for a subscriber that falls
    more than 1000 messages behind, and a throughput benchmark must not count drops as
    speed. ``set_tcp_nodelay true`` as recommended in docs for small messages.
    """

    kind = "mosquitto"

    def __init__(self, ids: dict[str, Identity], root: str, workdir: Path, *,
                 max_queued_messages: int | None = 0, extra: str = "") -> None:
        self.ids = ids
        self.root = root
        self.workdir = workdir / f"mosquitto-{uuid.uuid4().hex[:6]}"
        self.max_queued_messages = max_queued_messages
        self.extra = extra
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        passwd, acl = write_mosquitto_files(
            [(i.principal, hash_token(i.token)) for i in self.ids.values()], self.root,
            self.workdir)
        for attempt in range(3):
            self.port = free_port()
            lines = [
                f"listener {self.port} {LOCALHOST}",
                "allow_anonymous false",
                f"password_file {passwd}",
                f"acl_file {acl}",
                "persistence false",
                "set_tcp_nodelay true",
                f"log_dest file {self.workdir / 'mosquitto.log'}",
                "log_type error",
                "log_type warning",
                "connection_messages false",
            ]
            if self.max_queued_messages is not None:
                lines.append(f"max_queued_messages {self.max_queued_messages}")
            if os.geteuid() == 0:
                lines.append("user root")
            if self.extra:
                lines.append(self.extra)
            conf = self.workdir / "mosquitto.conf"
            conf.write_text("\n".join(lines) + "\n")
            self.proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(conf)], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=die_with_parent)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if port_open(LOCALHOST, self.port):
                    self.url = f"mqtt://{LOCALHOST}:{self.port}"
                    return self
                time.sleep(0.01)
            self.stop()
            if attempt == 2:
                log_file = self.workdir / "mosquitto.log"
                text = log_file.read_text() if log_file.exists() else ""
                raise RuntimeError(f"mosquitto did not start: {text[-2000:]}")
        raise AssertionError("unreachable")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def dict_authenticator(creds: dict[str, tuple[str, str]]) -> Callable[[str, str],
                                                                       Principal | None]:
    """An ``EmbeddedBroker`` authenticator over ``{user: (role, $7$ hash)}``."""

    def authenticate(user: str, token: str) -> Principal | None:
        entry = creds.get(user)
        if entry is None or not verify_token(token, entry[1]):
            return None
        return Principal(user, Role(entry[0]))

    return authenticate


def credentials(ids: dict[str, Identity]) -> dict[str, tuple[str, str]]:
    return {i.id: (i.role, hash_token(i.token)) for i in ids.values()}


def _amqtt_main(conn: Any, root: str, creds: dict[str, tuple[str, str]]) -> None:
    """Child process: the embedded broker with a dict-backed authenticator."""
    die_with_parent()
    quiet_logging()
    from broker.embedded import BrokerSettings, EmbeddedBroker

    broker = EmbeddedBroker(BrokerSettings(host=LOCALHOST, port=0, root=root),
                            dict_authenticator(creds))
    broker.start_in_thread()
    conn.send(broker.port)
    with contextlib.suppress(EOFError, OSError):
        conn.recv()  # "stop", or EOF when the parent is gone
    broker.stop_in_thread()


class AmqttBroker(Broker):
    """xcloud's EmbeddedBroker (amqtt + our auth/ACL plugins) in a spawned process."""

    kind = "amqtt"

    def __init__(self, ids: dict[str, Identity], root: str, _workdir: Path | None = None
                 ) -> None:
        self.ids = ids
        self.root = root
        self.proc: Any = None
        self._conn: Any = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return int(self.proc.pid)

    def start(self, timeout: float = 30.0) -> AmqttBroker:
        parent, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=_amqtt_main,
                                  args=(child, self.root, credentials(self.ids)),
                                  name="bench-amqtt", daemon=True)
        self.proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(timeout):
            self.stop()
            raise RuntimeError("amqtt broker did not start")
        port = parent.recv()
        self.url = f"mqtt://{LOCALHOST}:{port}"
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        with contextlib.suppress(OSError):
            self._conn.close()


def start_broker(kind: str, ids: dict[str, Identity], root: str, workdir: Path,
                 **mosquitto_options: Any) -> Broker:
    if kind == "mosquitto":
        return MosquittoBroker(ids, root, workdir, **mosquitto_options).start()
    if kind == "amqtt":
        return AmqttBroker(ids, root, workdir).start()
    raise ValueError(f"unknown broker {kind!r}")


# ----------------------------------------------------------------------------- paho


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or LOCALHOST, parts.port or 1883


def set_nodelay(client: mqtt.Client) -> None:
    sock = client.socket()
    raw: Any = getattr(sock, "_socket", sock)
    with contextlib.suppress(OSError, AttributeError):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def paho_connect(url: str, ident: Identity, client_id: str | None = None, *,
                 threaded: bool = True, timeout: float = 10.0,
                 on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None] | None = None,
                 subscribe: Sequence[tuple[str, int]] = ()) -> mqtt.Client:
    """A connected raw paho client (MQTT 3.1.1, TCP_NODELAY), subscriptions acknowledged.

    ``threaded``: paho's network loop runs in its own thread (``loop_start``); otherwise
    the caller drives ``client.loop()`` itself (lowest latency, no thread hand-off).
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or
                         f"{ident.id}-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311)
    client.username_pw_set(ident.id, ident.token)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    connected = threading.Event()
    subscribed = threading.Event()
    refused: list[str] = []

    def on_connect(c: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
            return
        set_nodelay(c)
        connected.set()

    def on_subscribe(_c: mqtt.Client, _userdata: Any, _mid: int, codes: Any, _props: Any) -> None:
        bad = [str(rc) for rc in codes if rc.is_failure]
        if bad:
            refused.append(f"subscription refused: {bad}")
        subscribed.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    if on_message is not None:
        client.on_message = on_message
    host, port = host_port(url)
    client.connect(host, port, keepalive=60)
    deadline = time.monotonic() + timeout

    def pump(event: threading.Event) -> None:
        while not event.is_set():
            if refused:
                raise RuntimeError(f"{ident.id}: {refused[0]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ident.id}: no answer from broker {url}")
            if threaded:
                event.wait(0.01)
            else:
                client.loop(0.01)

    if threaded:
        client.loop_start()
    pump(connected)
    if subscribe:
        client.subscribe(list(subscribe))
        pump(subscribed)
        if refused:
            raise RuntimeError(f"{ident.id}: {refused[0]}")
    return client


def paho_close(client: mqtt.Client, threaded: bool = True) -> None:
    with contextlib.suppress(Exception):
        client.disconnect()
    if threaded:
        with contextlib.suppress(Exception):
            client.loop_stop()


# ----------------------------------------------------------------------------- databases


def mariadb_connect(database: str | None = None) -> Any:
    import pymysql

    parts = urlsplit(MARIADB_SERVER)
    return pymysql.connect(host=parts.hostname or LOCALHOST, port=parts.port or 3306,
                           user=parts.username or "root", password=parts.password or "",
                           database=database, connect_timeout=5, autocommit=True)


def mariadb_available() -> bool:
    try:
        mariadb_connect().close()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    """A database URL for a fresh store: a SQLite file, or a MariaDB database dropped after."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:6]}.db'}"
        return
    if kind != "mariadb":
        raise ValueError(f"unknown database {kind!r}")
    name = f"xcloud_bench_{uuid.uuid4().hex[:10]}"
    parts = urlsplit(MARIADB_SERVER)
    try:
        yield f"{parts.scheme}://{parts.netloc}/{name}"
    finally:
        with contextlib.suppress(Exception):
            conn = mariadb_connect()
            try:
                with conn.cursor() as cur:
                    cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            finally:
                conn.close()


# ----------------------------------------------------------------------------- CPU


class CpuMeter:
    """CPU seconds (user+system) a process spent between ``start()`` and ``stop()``."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self._t0 = 0.0
        self._c0 = 0.0

    def _cpu(self) -> float:
        times = self.proc.cpu_times()
        return float(times.user + times.system)

    def start(self) -> CpuMeter:
        self._t0, self._c0 = time.monotonic(), self._cpu()
        return self

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        cpu = self._cpu() - self._c0
        return {"cpu_s": cpu, "wall_s": wall, "cpu_pct": 100.0 * cpu / wall if wall else 0.0}


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread of this process, by thread name (same names summed)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for th in psutil.Process().threads():
        name = names.get(th.id, f"tid-{th.id}")
        out[name] = out.get(name, 0.0) + th.user_time + th.system_time
    return out


# ----------------------------------------------------------------------------- markdown


def fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)):
        if digits == 0:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}"
    return str(value)


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "–"
    return f"{a / b:.{digits}f}×"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right."""
    align = [":---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def cli(name: str, description: str,
        run: Callable[..., dict[str, Any]], markdown: Callable[[dict[str, Any]], str],
        add_args: Callable[[argparse.ArgumentParser], None] | None = None,
        argv: Sequence[str] | None = None) -> int:
    """``python -m bench.<name> [--quick] [--json PATH] [extra args]``."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes (under ~20 s)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    quiet_logging()
    extra = {k: v for k, v in vars(args).items() if k not in ("quick", "json")}
    started = time.monotonic()
    load = LoadMonitor().start()
    result = run(quick=args.quick, **extra)
    result["load"] = load.stop()
    result.setdefault("elapsed_s", round(time.monotonic() - started, 1))
    result.setdefault("machine", machine())
    print(markdown(result))
    print(f"\n({name}: {result['elapsed_s']} s; other processes used "
          f"{result['load']['others_pct']:.0f} % of the machine meanwhile)", file=sys.stderr)
    if args.json:
        write_json(args.json, result)
    return 0


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every core; idle and iowait not
    counted): its difference over a run, divided by the jobs, is what each job cost."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def background_cpu_pct(interval: float = 1.0) -> float:
    """System-wide CPU use over ``interval`` (all cores = 100) while we are idle."""
    return float(psutil.cpu_percent(interval=interval))


def wait_for_quiet(max_wait: float = 60.0, threshold: float = 15.0) -> float:
    """Wait (bounded) until the machine is nearly idle; return the last CPU reading.

    Other jobs on a 2-core machine skew every number here, so the runner waits for a
    quiet moment and records what it saw.
    """
    deadline = time.monotonic() + max_wait
    busy = background_cpu_pct(1.0)
    while busy > threshold and time.monotonic() < deadline:
        busy = background_cpu_pct(1.0)
    return busy


# ----------------------------------------------------------------------------- grid pieces


def caps_payload(wid: str, heartbeat_s: float) -> bytes:
    """A valid ``worker.caps`` envelope for a simulated worker."""
    from schemas.codec import encode, envelope
    from schemas.messages import WorkerCaps

    caps = WorkerCaps(
        wid=wid, name=wid, tags=["bench"], slots=2, executors=["process"],
        host={"hostname": f"sim-{wid}", "os": "Linux", "arch": "x86_64", "python": "3.11"},
        cpu={"count": 4, "physical": 2, "model": "simulated", "freq_mhz": 2400.0},
        memory_bytes=8 * 2**30, disk_total_bytes=100 * 2**30, disk_free_bytes=50 * 2**30,
        heartbeat_s=heartbeat_s, agent_version="bench",
    )
    return encode(envelope(caps))


def heartbeat_payload(wid: str, seq: int, interval_s: float, *, validate: bool = True) -> bytes:
    """A valid ``worker.heartbeat`` envelope, shaped like a real agent's (~370 B)."""
    from schemas.codec import encode, envelope
    from schemas.messages import WorkerHeartbeat

    beat = WorkerHeartbeat(
        wid=wid, seq=seq, interval_s=interval_s, cpu_percent=12.5 + seq % 50,
        load1=0.42, load5=0.37, load15=0.30, mem_used_bytes=3_123_456_789,
        mem_available_bytes=4_987_654_321, disk_free_bytes=53_687_091_200,
        net_sent_bytes=123_456_789 + seq, net_recv_bytes=987_654_321 + seq,
        free_slots=2, running=[],
    )
    return encode(envelope(beat), validate=validate)


def _patch_body_fields() -> None:
    """What-if: ``Body.to_dict``/``from_dict`` use field names cached per class instead
    of calling ``dataclasses.fields()`` for every message."""
    import dataclasses
    import functools

    from schemas import messages

    @functools.cache
    def names(cls: type) -> tuple[tuple[str, ...], frozenset[str]]:
        fields = tuple(f.name for f in dataclasses.fields(cls))
        return fields, frozenset(fields)

    def to_dict(self: messages.Body) -> dict[str, Any]:
        cls: type = type(self)  # as type[Body], mypy fails it against Hashable
        return {n: v for n in names(cls)[0] if (v := getattr(self, n)) is not None}

    def from_dict(cls: Any, data: dict[str, Any]) -> Any:
        allowed = names(cls)[1]
        return cls(**{k: v for k, v in data.items() if k in allowed})

    messages.Body.to_dict = to_dict  # type: ignore[method-assign]
    messages.Body.from_dict = classmethod(from_dict)  # type: ignore[assignment]


def _patch_switch_interval() -> None:
    """What-if: a 0.5 ms GIL switch interval instead of 5 ms. A thread that released
    the GIL for a database call waits up to the switch interval to get it back while
    CPU-bound threads (paho's reader, the lanes) run: the convoy effect."""
    sys.setswitchinterval(0.0005)


PATCHES: dict[str, Callable[[], None]] = {
    "body-fields": _patch_body_fields,
    "switch-interval": _patch_switch_interval,
}
"""Optional in-process monkeypatches for the benchmark coordinator: they measure what a
suggested change to non-bench code would gain, without making it."""


def _coordinator_main(conn: Any, bus_url: str, root: str, ident: Identity, db_url: str,
                      home: str, coord_settings: dict[str, Any],
                      patches: Sequence[str] = (),
                      embed_creds: dict[str, tuple[str, str]] | None = None) -> None:
    """Child process: a real Coordinator (store, bus, registry) plus a command loop.

    With ``embed_creds`` the embedded amqtt broker runs in this same process, as with
    ``xcloud up`` and ``xcloud coordinator --embed-broker`` (one GIL for both).
    Commands (tuples over the pipe): ``("stats",)``, ``("arm", target, stall_s,
    deadline_s)`` then ``("wait",)``, ``("rows",)``, ``("stop",)``.
    """
    die_with_parent()
    quiet_logging()
    os.environ["XCLOUD_HOME"] = home  # keys and data stay in the scratch directory
    for name in patches:
        PATCHES[name]()
    from broker.config import BusConfig, Config
    from coordinator.service import Coordinator
    from coordinator.store import Store

    embedded = None
    if embed_creds is not None:
        from broker.embedded import BrokerSettings, EmbeddedBroker

        embedded = EmbeddedBroker(BrokerSettings(host=LOCALHOST, port=0, root=root),
                                  dict_authenticator(embed_creds))
        embedded.start_in_thread()
        bus_url = embedded.url
    store = Store.open(db_url)
    cfg = Config()
    cfg.home = Path(home)
    cfg.coordinator.data_dir = str(Path(home) / "data")
    cfg.bus = BusConfig(url=bus_url, principal=ident.id, token=ident.token, root=root)
    cfg.coordinator.db = db_url
    for key, value in coord_settings.items():
        setattr(cfg.coordinator, key, value)
    coord = Coordinator(cfg, store)
    coord.start(wait=True)
    registry = coord.registry
    me = psutil.Process()
    sampler: dict[str, Any] = {}

    def lane_backlog(name: str) -> int:
        lane = getattr(coord.bus, "_lanes", {}).get(name)  # diagnostics only
        return lane.queue.qsize() if lane is not None else 0

    def measure(target: int, stall_s: float, deadline_s: float) -> None:
        base = registry.heartbeats_ingested
        t_arm = time.monotonic()
        c0 = me.cpu_times()
        thr0 = thread_cpu()
        first_t = last_t = None
        first_n = 0
        last_v = base
        max_backlog = 0
        while True:
            v = registry.heartbeats_ingested
            now = time.monotonic()
            if v != last_v:
                if first_t is None:
                    first_t, first_n = now, v - base
                last_t, last_v = now, v
            max_backlog = max(max_backlog, lane_backlog("heartbeat"))
            if v - base >= target:
                break
            if last_t is not None and now - last_t > stall_s:
                break
            if now - t_arm > deadline_s:
                break
            time.sleep(0.002)
        end = time.monotonic()
        c1 = me.cpu_times()
        thr1 = thread_cpu()
        sampler["result"] = {
            "n": last_v - base, "t_arm": t_arm, "first_t": first_t, "first_n": first_n,
            "last_t": last_t, "t_end": end,
            "cpu_s": (c1.user + c1.system) - (c0.user + c0.system),
            "threads": {k: v - thr0.get(k, 0.0) for k, v in thr1.items()},
            "max_lane_backlog": max_backlog,
        }

    try:
        conn.send(("ready", os.getpid(), bus_url))
        while True:
            try:
                cmd, *args = conn.recv()
            except (EOFError, OSError):
                break
            if cmd == "stats":
                conn.send({"ingested": registry.heartbeats_ingested,
                           "tracked": registry.monitor.tracked(),
                           "backlog": lane_backlog("heartbeat"),
                           "registry_backlog": lane_backlog("registry")})
            elif cmd == "arm":
                sampler.clear()
                thread = threading.Thread(target=measure, args=tuple(args), daemon=True)
                sampler["thread"] = thread
                thread.start()
                conn.send("armed")
            elif cmd == "wait":
                sampler["thread"].join(args[0] if args else 600)
                conn.send(sampler.get("result"))
            elif cmd == "rows":
                with store.db.connection_context():
                    conn.send(store.models.WorkerSample.select().count())
            elif cmd == "stop":
                break
    finally:
        coord.stop()
        store.close()
        if embedded is not None:
            embedded.stop_in_thread()
        with contextlib.suppress(OSError):
            conn.send("stopped")


class CoordinatorProcess:
    """A coordinator (``coordinator.service.Coordinator``) in its own spawned process."""

    def __init__(self, bus_url: str, root: str, ident: Identity, db_url: str, home: Path,
                 patches: Sequence[str] = (),
                 embed_creds: dict[str, tuple[str, str]] | None = None,
                 **coord_settings: Any) -> None:
        self.args = (bus_url, root, ident, db_url, str(home), coord_settings, tuple(patches),
                     embed_creds)
        self.proc: Any = None
        self.conn: Any = None
        self.pid = 0
        self.url = bus_url  # the embedded broker's URL when there is one

    def start(self, timeout: float = 60.0) -> CoordinatorProcess:
        self.conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=_coordinator_main, args=(child, *self.args),
                                  name="bench-coordinator", daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(timeout):
            self.stop()
            raise RuntimeError("coordinator did not start")
        _, self.pid, self.url = self.conn.recv()
        return self

    def call(self, *cmd: Any, timeout: float = 60.0) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"coordinator: no answer to {cmd[0]} within {timeout:g} s")
        return self.conn.recv()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(("stop",))
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        with contextlib.suppress(OSError):
            self.conn.close()

    def __enter__(self) -> CoordinatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_coordinator_ready(url: str, ident: Identity, root: str, timeout: float = 30.0) -> None:
    """Until the coordinator answers a ``ping`` (its subscriptions are then in place:
    the inbox and the worker topics go out in one SUBSCRIBE)."""
    from broker.bus import Bus, RequestTimeout
    from broker.config import BusConfig
    from schemas.messages import Ping
    from schemas.topics import Topics

    topics = Topics(root)
    bus = Bus(BusConfig(url=url, principal=ident.id, token=ident.token, root=root),
              inbox=topics.client_inbox(ident.id))
    bus.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                bus.request(topics.coord_inbox, Ping(), timeout=1.0)
                return
            except RequestTimeout:
                if time.monotonic() > deadline:
                    raise
    finally:
        bus.stop()


def publish_caps(url: str, ident: Identity, root: str, wids: Sequence[str],
                 heartbeat_s: float, timeout: float = 120.0) -> float:
    """Publish a ``worker.caps`` (QoS 1, not retained) per wid; seconds until all acked."""
    from schemas.topics import Topics

    topics = Topics(root)
    payloads = [(topics.worker_caps(w), caps_payload(w, heartbeat_s)) for w in wids]
    client = paho_connect(url, ident)
    try:
        t0 = time.monotonic()
        infos = [client.publish(topic, payload, 1) for topic, payload in payloads]
        deadline = t0 + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        return time.monotonic() - t0
    finally:
        paho_close(client)


class LoadMonitor:
    """How much of the machine *other* processes used while a benchmark ran.

    System-wide busy CPU time (psutil) minus this process tree's CPU time (itself, its
    reaped children via ``os.times()``, and live descendants), as % of all cores.
    """

    def __init__(self) -> None:
        self._t0 = 0.0
        self._busy0 = 0.0
        self._ours0 = 0.0

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        return float(sum(t) - idle)

    @staticmethod
    def _ours() -> float:
        t = os.times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return float(total)

    def start(self) -> LoadMonitor:
        self._t0, self._busy0, self._ours0 = time.monotonic(), self._busy(), self._ours()
        return self

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        cores = psutil.cpu_count() or 1
        busy = self._busy() - self._busy0
        ours = self._ours() - self._ours0
        return {"wall_s": wall,
                "ours_pct": 100.0 * ours / (wall * cores) if wall else 0.0,
                "others_pct": max(0.0, 100.0 * (busy - ours) / (wall * cores)) if wall else 0.0}


class QuietBus:
    """Stands in for the bus in an offline scheduler pass: events and assignments go
    nowhere (the pass's decisions are in the store)."""

    def send(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def publish(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def publish_bytes(self, *_args: Any, **_kwargs: Any) -> None:  # job events
        return None
