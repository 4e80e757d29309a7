"""SessionReconciler: closes worker sessions whose reservations are over.

A ``reservation.close`` can be lost: the worker was down when it was sent, or the
broker that queued it stopped. Workers list their open sessions in every heartbeat
(``running`` items of kind ``reservation``); any session whose reservation is unknown,
ended, or held on another worker is closed again. So a worker never keeps a stale
session (and its slot, processes and container) for longer than a heartbeat or two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from broker.bus import Bus
from coordinator.reservation_state import ReservationState
from coordinator.store import Store
from schemas.messages import ReservationClose
from schemas.topics import Topics

log = logging.getLogger(__name__)

RESEND_AFTER_S = 10.0


class SessionReconciler:
    """Listens to heartbeats (``WorkerRegistry.heartbeat_listeners``)."""

    def __init__(self, bus: Bus, store: Store, topics: Topics,
                 clock: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self.store = store
        self.topics = topics
        self._clock = clock
        self._sent: dict[tuple[str, str], float] = {}

    def on_heartbeat(self, wid: str, running: list[dict[str, Any]]) -> None:
        rids = [str(item.get("id")) for item in running if item.get("kind") == "reservation"]
        now = self._clock()
        for rid in rids:
            record = self.store.get_reservation(rid)
            if record is not None and record.worker_id == wid and (
                    record.state != ReservationState.ENDED):
                continue
            key = (wid, rid)
            if now - self._sent.get(key, 0.0) < RESEND_AFTER_S:
                continue
            self._sent[key] = now
            reason = record.ended_reason if record and record.ended_reason else "not reserved"
            log.info("worker %s still holds session %s (%s); closing it", wid, rid, reason)
            self.bus.send(self.topics.worker_inbox(wid),
                          ReservationClose(reservation=rid, reason=reason[:1024]))
        if len(self._sent) > 10_000:
            self._sent = {k: t for k, t in self._sent.items() if now - t < RESEND_AFTER_S}
