"""Live updates for open dashboard pages, as server-sent events (``GET /api/events``).

Why SSE rather than a WebSocket or MQTT over the broker's WebSocket listener: updates
flow one way (server to page); SSE is plain HTTP through the same listener, cookie and
CSRF-free GET as the rest of the API, reconnects by itself (``EventSource``), and needs
no client library. Pages act on what they read with ordinary POSTs. MQTT in the browser
would put the grid's bus (and a principal's broker credentials) in every page.

One ``LiveFeed`` per dashboard: every ``tick_s`` it reads, once for all subscribers, the
workers whose row changed since the previous tick (heard from, state moved), the
grid-wide snapshot and digests of the reservations and of the jobs, and queues the same
``tick`` event to every open page. Its cost grows with the grid's activity, not with the number of
pages; a page that cannot keep up (a full queue) is dropped and reconnects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from coordinator.monitoring.grid_series import GridSampler, RunningWork
from coordinator.monitoring.job_queries import jobs_digest
from coordinator.monitoring.rollup import gpu_usage
from coordinator.store import Store
from coordinator.store.values import loads

log = logging.getLogger(__name__)

QUEUE_MAX = 32  # ticks a page may be behind before it is dropped
OVERLAP_S = 3.0  # re-read this much before the previous tick (rows are written late)
MAX_CHANGES = 20_000
KNOWN_MAX = 200_000


def worker_live_row(row: tuple[Any, ...], previous: dict[str, Any] | None,
                    execs: int) -> dict[str, Any]:
    """The compact live view of one worker row of ``Store.worker_changes``."""
    wid, name, state, changed_at, slots, free, last_seen, last_hb, text = row
    metrics = loads(text, {})
    metrics = metrics if isinstance(metrics, dict) else {}
    live: dict[str, Any] = {
        "id": wid, "name": name, "state": state, "state_changed_at": changed_at,
        "slots": slots, "free_slots": free, "last_seen": last_seen, "t": last_hb,
        "execs": execs,
    }
    for key, short in (("cpu_percent", "cpu"), ("load1", "load"), ("mem_used_bytes", "mem"),
                       ("mem_available_bytes", "mem_available"),
                       ("disk_free_bytes", "disk_free")):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            live[short] = value
    gpu, gpu_mem = gpu_usage(metrics)
    if gpu is not None:
        live["gpu"] = gpu
    if gpu_mem is not None:
        live["gpu_mem"] = gpu_mem
    rx, tx = metrics.get("net_recv_bytes"), metrics.get("net_sent_bytes")
    live["_net"] = (last_hb, rx, tx)
    if previous is not None and last_hb is not None:
        then, rx0, tx0 = previous.get("_net", (None, None, None))
        if then is not None and last_hb > then and None not in (rx, tx, rx0, tx0) and (
                rx >= rx0 and tx >= tx0):
            live["rx"] = (rx - rx0) / (last_hb - then)
            live["tx"] = (tx - tx0) / (last_hb - then)
        elif last_hb == then:
            for key in ("rx", "tx"):
                if key in previous:
                    live[key] = previous[key]
    return live


class LiveFeed:
    """Builds ticks (in a worker thread) and fans them out (on the server's loop)."""

    def __init__(self, store: Store, sampler: GridSampler, running: RunningWork,
                 tick_s: float, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.sampler = sampler
        self.running = running
        self.tick_s = max(0.2, tick_s)
        self._clock = clock
        self._since: float | None = None
        self._known: dict[str, dict[str, Any]] = {}
        self._digest: tuple[Any, ...] = ()
        self._jobs_digest: tuple[Any, ...] | None = None
        self.subscribers: set[asyncio.Queue[str | None]] = set()
        self.ticks = 0

    def subscribe(self) -> asyncio.Queue[str | None]:
        queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUE_MAX)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str | None]) -> None:
        self.subscribers.discard(queue)

    async def run(self, run_blocking: Callable[..., Any]) -> None:
        """Tick until cancelled; builds nothing while nobody watches."""
        while True:
            await asyncio.sleep(self.tick_s)
            if not self.subscribers:
                self._since = None  # the next watcher starts from a fresh read
                self._jobs_digest = None
                continue
            try:
                message = await run_blocking(self.build_tick)
            except Exception:
                log.exception("live update failed")
                continue
            self.publish(message)

    def publish(self, message: str) -> None:
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                log.info("a dashboard page fell behind its live updates; dropping it")
                self.subscribers.discard(queue)
                while not queue.empty():  # make room for the "you are dropped" mark
                    queue.get_nowait()
                queue.put_nowait(None)

    def build_tick(self) -> str:
        """One ``tick`` event's data (JSON): changed workers, grid values, digest."""
        now = self._clock()
        since = (self._since if self._since is not None else now) - OVERLAP_S
        self._since = now
        changed = []
        for row in self.store.worker_changes(since, MAX_CHANGES):
            wid = row[0]
            previous = self._known.get(wid)
            live = worker_live_row(row, previous, self.running.execs(wid))
            if previous is not None and _same(previous, live):
                continue
            self._known[wid] = live
            changed.append({k: v for k, v in live.items() if not k.startswith("_")})
        if len(self._known) > KNOWN_MAX:
            self._known.clear()
        digest = self.store.reservation_digest()
        reservations_changed = digest != self._digest
        self._digest = digest
        # Jobs: pages refetch their own (audience-filtered) lists when anything moved.
        jobs = jobs_digest(self.store)
        jobs_changed = self._jobs_digest is not None and jobs != self._jobs_digest
        self._jobs_digest = jobs
        self.ticks += 1
        return json.dumps({"now": now, "workers": changed, "grid": self.sampler.snapshot(),
                           "reservations_changed": reservations_changed,
                           "jobs_changed": jobs_changed},
                          separators=(",", ":"), allow_nan=False, default=str)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a.get("state"), a.get("t"), a.get("free_slots"), a.get("execs")) == (
        b.get("state"), b.get("t"), b.get("free_slots"), b.get("execs"))
