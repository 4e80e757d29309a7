"""WorkerRegistry: turns worker presence messages into store writes and state changes.

Caps and status (retained, QoS 1) are handled one by one; heartbeats (QoS 0, the bulk of
the traffic) are appended to a batch that a writer thread flushes in one transaction
every ``flush_s`` seconds. Liveness is the HeartbeatMonitor's job; this class reacts to
its verdicts and to last wills.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from broker.bus import Incoming
from coordinator.errors import CoordinatorError
from coordinator.liveness import HeartbeatMonitor
from coordinator.store import Store
from coordinator.worker_state import WorkerState
from schemas.messages import CapsRefresh, WorkerCaps, WorkerEvent, WorkerHeartbeat, WorkerStatus
from schemas.topics import Topics

log = logging.getLogger(__name__)

BACKLOG_DEFER = 200  # unhandled heartbeats above which a missed deadline is re-checked

EventSink = Callable[[WorkerEvent], None]
StateListener = Callable[[str, WorkerState, WorkerState, str], None]
HeartbeatListener = Callable[[str, list[dict[str, Any]]], None]
"""Called as (wid, running items) with each worker's latest heartbeat of a written batch."""
"""Called as (wid, old, new, reason) after every committed worker state change."""
CapsRequester = Callable[[str, CapsRefresh], None]


class WorkerRegistry:
    """The coordinator's view of the workers; the store holds the truth."""

    def __init__(
        self,
        store: Store,
        topics: Topics,
        *,
        liveness_factor: float,
        default_interval: float,
        flush_s: float,
        publish_event: EventSink,
        request_caps: CapsRequester,
        clock: Callable[[], float] = time.time,
        is_connected: Callable[[], bool] = lambda: True,
        backlog: Callable[[], int] = lambda: 0,
    ) -> None:
        self.store = store
        self.topics = topics
        self.default_interval = default_interval
        self.flush_s = flush_s
        self._publish_event = publish_event
        self._request_caps = request_caps
        self._clock = clock
        self._is_connected = is_connected
        self._backlog = backlog
        self._deferred: dict[str, float] = {}  # wid -> first deadline passed under backlog
        self._timers_loaded = False
        self.monitor = HeartbeatMonitor(liveness_factor, self._on_deadline, clock=clock)
        self._batch: list[tuple[str, dict[str, Any], float]] = []
        self._batch_lock = threading.Lock()
        self._flush_event = threading.Event()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._asked_caps: dict[str, float] = {}
        self.heartbeats_ingested = 0
        self.state_lock = threading.Lock()  # serialises state changes across lanes
        self.state_listeners: list[StateListener] = []
        self.heartbeat_listeners: list[HeartbeatListener] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the monitor and the heartbeat writer; timers are armed on connect."""
        self.monitor.start()
        self._writer = threading.Thread(target=self._write_loop, name="heartbeat-writer",
                                        daemon=True)
        self._writer.start()

    def on_bus_connected(self) -> None:
        """(Re)arm liveness timers once our subscriptions are live.

        First connect: rebuild the timers of live workers from the store. Every worker
        gets a full deadline from now: while we were away (or not yet subscribed) their
        heartbeats went nowhere, which is not their fault. Later reconnects refresh the
        deadlines for the same reason.
        """
        now = self._clock()
        if self._timers_loaded:
            self.monitor.refresh_all(now)
            return
        self._timers_loaded = True
        for wid, _last_seen, interval in self.store.live_worker_deadlines():
            self.monitor.track(wid, now, interval or self.default_interval)

    def stop(self) -> None:
        self._stop.set()
        self._flush_event.set()
        if self._writer:
            self._writer.join(10)
        self.monitor.stop()
        self.flush()

    # -- message handlers (bus lanes) --------------------------------------------------

    def _owner(self, incoming: Incoming, claimed: str) -> str | None:
        """The worker id of a presence topic, if the body names the same worker.

        The ACL only lets worker W publish under ``worker/W/``; a body naming another
        worker is a bug or an attack, and is dropped.
        """
        wid = self.topics.worker_of(incoming.topic)
        if wid is None or claimed != wid:
            log.warning("dropped %s on %s naming worker %r", incoming.message.type,
                        incoming.topic, claimed)
            return None
        return wid

    def on_caps(self, incoming: Incoming) -> None:
        body: WorkerCaps = incoming.body
        wid = self._owner(incoming, body.wid)
        if wid is None:
            return
        now = self._clock()
        with self.state_lock:
            before = self.store.get_worker(wid)
            record = self.store.upsert_worker_caps(wid, body.to_dict(), now,
                                                   keep_state=incoming.retained)
            if before is None:
                self._emit(wid, record.name, None, record.state, "joined")
            elif before.state != record.state:
                self._emit(wid, record.name, before.state, record.state, "capabilities")
        self._asked_caps.pop(wid, None)
        if record.state in (WorkerState.ONLINE, WorkerState.DRAINING):
            self.monitor.track(wid, now, body.heartbeat_s or self.default_interval)

    def on_status(self, incoming: Incoming) -> None:
        body: WorkerStatus = incoming.body
        wid = self._owner(incoming, body.wid)
        if wid is None:
            return
        now = self._clock()
        if body.state == "offline":
            target = WorkerState.OFFLINE if body.clean else WorkerState.LOST
            reason = body.reason or ("clean shutdown" if body.clean else "connection lost")
            self.monitor.forget(wid)
        else:
            target = WorkerState(body.state)
            reason = body.reason or f"worker says {body.state}"
        if self.store.get_worker(wid) is None:
            if target in (WorkerState.ONLINE, WorkerState.DRAINING):
                self._ask_caps(wid, now)
            return
        self._transition(wid, target, reason, now, seen=True)
        if target in (WorkerState.ONLINE, WorkerState.DRAINING):
            record = self.store.get_worker(wid)
            interval = (record.heartbeat_interval if record else 0) or self.default_interval
            self.monitor.track(wid, now, interval)

    def on_heartbeat(self, incoming: Incoming) -> None:
        """Hot path: validate ownership, note liveness, queue the write."""
        body: WorkerHeartbeat = incoming.body
        wid = self.topics.worker_of(incoming.topic)
        if wid is None or body.wid != wid:
            return
        now = self._clock()
        self.monitor.beat(wid, now, body.interval_s)
        if self._deferred:
            self._deferred.pop(wid, None)
        with self._batch_lock:
            self._batch.append((wid, body.to_dict(), now))
            if len(self._batch) >= 5000:
                self._flush_event.set()

    # -- writing -------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            self._flush_event.wait(self.flush_s)
            self._flush_event.clear()
            try:
                self.flush()
            except CoordinatorError as err:
                log.error("heartbeat batch not written: %s", err)
            except Exception:
                log.exception("heartbeat batch not written")

    def flush(self) -> None:
        """Write queued heartbeats in one transaction and react to what they reveal."""
        with self._batch_lock:
            batch, self._batch = self._batch, []
        if not batch:
            return
        result = self.store.record_heartbeats(batch)
        self.heartbeats_ingested += len(batch)
        now = self._clock()
        if self.heartbeat_listeners:
            latest = {wid: body.get("running") or [] for wid, body, _ in batch}
            for wid, running in latest.items():
                for listener in self.heartbeat_listeners:
                    try:
                        listener(wid, running)
                    except Exception:
                        log.exception("heartbeat listener failed for %s", wid)
        for wid in result.unknown:
            self._ask_caps(wid, now)
        for wid in result.inactive:
            # Heard from a worker we had written off: it is alive after all.
            record = self.store.get_worker(wid)
            if record is None or record.state != WorkerState.LOST:
                continue
            if record.state_changed_at >= now - self.flush_s * 2 - 0.5:
                continue  # a heartbeat that was in flight when it was declared lost
            self._transition(wid, WorkerState.ONLINE, "heartbeat after lost", now, seen=True)
            self.monitor.track(wid, now, record.heartbeat_interval or self.default_interval)

    # -- state changes -------------------------------------------------------------------

    def _on_deadline(self, wid: str, silent_for: float) -> None:
        now = self._clock()
        record = self.store.get_worker(wid)
        interval = (record.heartbeat_interval if record else 0) or self.default_interval
        if not self._is_connected():
            # We cannot hear anybody: silence says nothing about the worker.
            self.monitor.track(wid, now, interval)
            return
        if self._backlog() > BACKLOG_DEFER:
            # Its heartbeat may be waiting in our own queue: an overloaded coordinator must
            # not write off healthy workers. Look again shortly, for one interval at most.
            first = self._deferred.setdefault(wid, now)
            if now - first < interval:
                recheck = min(0.25, interval / 4)
                self.monitor.track(wid, now + recheck - self.monitor.factor * interval,
                                   interval)
                return
        self._deferred.pop(wid, None)
        self.flush()
        self._transition(wid, WorkerState.LOST, f"no heartbeat for {silent_for:.1f}s",
                         self._clock())

    def set_state(self, wid: str, state: WorkerState, reason: str) -> None:
        """A state change ordered from outside (admin, tests)."""
        self._transition(wid, state, reason, self._clock())
        if state not in (WorkerState.ONLINE, WorkerState.DRAINING):
            self.monitor.forget(wid)

    def _transition(self, wid: str, state: WorkerState, reason: str, now: float,
                    *, seen: bool = False) -> None:
        with self.state_lock:
            try:
                change = self.store.set_worker_state(wid, state, reason, now, seen=seen)
            except CoordinatorError as err:
                log.warning("worker %s: %s", wid, err)
                return
        if change is None:
            return
        old, new = change
        record = self.store.get_worker(wid)
        log.info("worker %s: %s -> %s (%s)", wid, old, new, reason)
        self._emit(wid, record.name if record else None, old, new, reason)
        for listener in self.state_listeners:
            try:
                listener(wid, old, new, reason)
            except Exception:
                log.exception("state listener failed for %s", wid)

    def _emit(self, wid: str, name: str | None, old: Any, new: Any, reason: str) -> None:
        old_v = old.value if isinstance(old, WorkerState) else old
        new_v = new.value if isinstance(new, WorkerState) else new
        try:
            self._publish_event(WorkerEvent(wid=wid, name=name, old_state=old_v,
                                            new_state=new_v, reason=reason[:1024]))
        except Exception:
            log.exception("could not publish worker event")

    def _ask_caps(self, wid: str, now: float) -> None:
        """Ask an unknown worker to introduce itself, at most every 10 s."""
        if now - self._asked_caps.get(wid, 0.0) < 10.0:
            return
        self._asked_caps[wid] = now
        self._request_caps(wid, CapsRefresh())
