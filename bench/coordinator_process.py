"""The coordinator under test: the real ``coordinator.service.Coordinator`` in a spawned
process of its own, with a command pipe through which a benchmark reads how many
heartbeats it ingested, its CPU per thread and its lane backlogs. Optionally the embedded
broker runs in the same process (as ``xcloud up`` runs it), and "what-if" monkeypatches
(``PATCHES``) measure a suggested change to the coordinator without making it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from bench.cpu_load import thread_cpu
from bench.identities import Identity, dict_authenticator
from bench.processes import LOCALHOST, SPAWN, die_with_parent, quiet_logging

# ----------------------------------------------------------------------------- what-if


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


# ----------------------------------------------------------------------------- coordinator


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
    from broker.bus_types import Lane
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
        return coord.bus.backlog(Lane(name))  # 0 for a lane not started

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
    """A coordinator (``coordinator.service.Coordinator``) in its own spawned process.

    ``ident`` and every principal that talks to it must already be registered in the
    store at ``db_url`` (``bench.identities.registered``): the coordinator serves
    requests only to live principals of its store."""

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
