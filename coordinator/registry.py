"""WorkerRegistry: turns worker presence messages into store writes and state changes.

Caps and status (retained, QoS 1) are handled one by one; heartbeats (QoS 0, the bulk of
the traffic) are appended to a batch that a writer thread flushes in one transaction
every ``flush_s`` seconds. Liveness is the HeartbeatMonitor's job; this class reacts to
its verdicts and to last wills.

A last will only makes a worker *suspect* (docs/state-machines.md, "Last wills and broker
outages"): it is lost once silent for ``will_confirm_s`` while our own connection stayed
up, which a broker that is shutting down (it publishes every will, then drops us) never
lets happen. Wills that may be stale (retained, or replayed from our persistent session
when we reconnect, as a broker with persistence does with those of its own shutdown) are
confirmed only by silence past the worker's heartbeat deadline; after a reconnect nobody
is found lost for ``reconnect_grace_s`` (the workers reconnect with their own back-off).
A heartbeat from a LOST or OFFLINE worker brings it back ONLINE.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from broker.bus import Incoming, LinkState
from coordinator.errors import CoordinatorError, InvalidArgument
from coordinator.liveness import HeartbeatMonitor, Suspicion
from coordinator.store import Store
from coordinator.worker_state import WorkerState
from schemas.messages import CapsRefresh, WorkerCaps, WorkerEvent, WorkerHeartbeat, WorkerStatus
from schemas.topics import Topics

log = logging.getLogger(__name__)

BACKLOG_DEFER = 200  # unhandled heartbeats above which a missed deadline is re-checked
IN_FLIGHT_S = 0.5  # a heartbeat received this soon after a loss may predate it

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
        link: Callable[[], LinkState] | None = None,
        will_confirm_s: float = 1.0,
        reconnect_grace_s: float = 0.0,
    ) -> None:
        self.store = store
        self.topics = topics
        self.default_interval = default_interval
        self.flush_s = flush_s
        self.will_confirm_s = will_confirm_s
        self.reconnect_grace_s = reconnect_grace_s
        self._publish_event = publish_event
        self._request_caps = request_caps
        self._clock = clock
        self._link: Callable[[], LinkState] = link or (
            lambda: LinkState(is_connected(), 1, 0.0))
        self._epoch = 0 if link else 1  # the connection our timers were last armed for
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
        # (wid, attempt ids) of each worker's latest heartbeat that carries ``attempts``
        # (batch jobs: coordinator/scheduler.py reconciles them).
        self.attempt_listeners: list[Callable[[str, list[str]], None]] = []
        # wid after each capability document written (a join, new slots): the scheduler.
        self.caps_listeners: list[Callable[[str], None]] = []

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
        epoch = self._link().epoch
        if self._timers_loaded:
            # After a reconnect the workers are reconnecting too (with their back-off):
            # nobody is lost before the grace is over.
            self.monitor.refresh_all(now, hold_until=now + self.reconnect_grace_s)
            self._epoch = epoch
            return
        self._timers_loaded = True
        for wid, _last_seen, interval in self.store.live_worker_deadlines():
            self.monitor.track(wid, now, interval or self.default_interval)
        self._epoch = epoch

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
            try:
                record = self.store.upsert_worker_caps(wid, body.to_dict(), now,
                                                       keep_state=incoming.retained)
            except InvalidArgument as err:
                log.warning("dropped caps of worker %s: %s", wid, err)
                return
            if before is None:
                self._emit(wid, record.name, None, record.state, "joined")
            elif before.state != record.state:
                self._emit(wid, record.name, before.state, record.state, "capabilities")
        self._asked_caps.pop(wid, None)
        if record.state in (WorkerState.ONLINE, WorkerState.DRAINING):
            self.monitor.track(wid, now, body.heartbeat_s or self.default_interval)
        for caps_listener in self.caps_listeners:
            try:
                caps_listener(wid)
            except Exception:
                log.exception("caps listener failed for %s", wid)

    def on_status(self, incoming: Incoming) -> None:
        body: WorkerStatus = incoming.body
        wid = self._owner(incoming, body.wid)
        if wid is None:
            return
        now = self._clock()
        if body.state == "offline" and not body.clean:
            self._suspect(wid, body.reason or "connection lost", now, incoming)
            return
        if body.state == "offline":
            target = WorkerState.OFFLINE
            reason = body.reason or "clean shutdown"
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

    def _suspect(self, wid: str, reason: str, now: float, incoming: Incoming) -> None:
        """A last will (the broker says the worker's connection died): suspect it.

        Lost after ``will_confirm_s`` of silence if the will is fresh (received live on
        our current connection) and that connection stays up; otherwise (retained, or
        replayed from our persistent session after a reconnect, as a broker with
        persistence does with the wills of its own shutdown) only past the worker's
        heartbeat deadline.
        """
        record = self.store.get_worker(wid)
        if record is None or not record.state.is_live:
            return  # unknown, or already lost or offline: nothing to suspect
        link = self._link()
        fresh = (not incoming.retained and link.connected and link.epoch == self._epoch
                 and incoming.received_at >= link.ready_at)
        confirm_at = now + self.will_confirm_s if fresh else None
        interval = record.heartbeat_interval or self.default_interval
        self.monitor.suspect(wid, Suspicion(now, reason, confirm_at, link.epoch), interval)
        log.info("worker %s: last will (%s); lost %s unless heard from", wid, reason,
                 f"in {self.will_confirm_s:.1f}s" if fresh else "at its heartbeat deadline")

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
        # Stamped when paho read it, not when this lane got to it: a heartbeat that
        # waited in our queue must not look newer than a status that overtook it.
        received = (now - max(0.0, time.monotonic() - incoming.received_at)
                    if incoming.received_at else now)
        with self._batch_lock:
            self._batch.append((wid, body.to_dict(), received))
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
        if self.attempt_listeners:
            attempts = {wid: body["attempts"] for wid, body, _ in batch
                        if isinstance(body.get("attempts"), list)}
            for wid, listed in attempts.items():
                for attempt_listener in self.attempt_listeners:
                    try:
                        attempt_listener(wid, listed)
                    except Exception:
                        log.exception("attempt listener failed for %s", wid)
        for wid in result.unknown:
            self._ask_caps(wid, now)
        if result.inactive:
            received: dict[str, float] = {}
            for wid, _, ts in batch:
                received[wid] = max(ts, received.get(wid, ts))
            for wid in result.inactive:
                self._heard_inactive(wid, received[wid], now)

    def _heard_inactive(self, wid: str, received_at: float, now: float) -> None:
        """A heartbeat from a worker we had written off (LOST) or that was marked OFFLINE
        (by an admin, another coordinator, a stale status): it is alive after all."""
        record = self.store.get_worker(wid)
        if record is None or record.state not in (WorkerState.LOST, WorkerState.OFFLINE):
            return
        if received_at <= record.state_changed_at + IN_FLIGHT_S:
            return  # sent before it was declared lost or said goodbye; the next one counts
        self._transition(wid, WorkerState.ONLINE, f"heartbeat after {record.state.value}",
                         now, seen=True)
        self.monitor.track(wid, now, record.heartbeat_interval or self.default_interval)

    # -- state changes -------------------------------------------------------------------

    def _on_deadline(self, wid: str, silent_for: float, suspicion: Suspicion | None) -> None:
        now = self._clock()
        record = self.store.get_worker(wid)
        interval = (record.heartbeat_interval if record else 0) or self.default_interval
        link = self._link()
        if not link.connected or link.epoch != self._epoch:
            # We cannot hear anybody, or we reconnected and our timers are not re-armed
            # yet: silence says nothing about the worker.
            self.monitor.track(wid, now, interval)
            return
        if (suspicion is not None and suspicion.confirm_at is not None
                and suspicion.epoch != link.epoch):
            self.monitor.track(wid, now, interval)  # cut off since its will: no verdict
            return
        if self._backlog() > BACKLOG_DEFER:
            # Its heartbeat may be waiting in our own queue: an overloaded coordinator must
            # not write off healthy workers. Look again shortly, for one interval at most.
            first = self._deferred.setdefault(wid, now)
            if now - first < interval:
                recheck = min(0.25, interval / 4)
                self.monitor.track(wid, now + recheck - self.monitor.factor * interval,
                                   interval)
                if suspicion is not None:  # keep why it is suspect, decide at the recheck
                    self.monitor.suspect(wid, Suspicion(suspicion.at, suspicion.reason, None,
                                                        suspicion.epoch), interval)
                return
        self._deferred.pop(wid, None)
        self.flush()
        reason = suspicion.reason if suspicion else f"no heartbeat for {silent_for:.1f}s"
        self._transition(wid, WorkerState.LOST, reason, self._clock())

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
