"""SessionReconciler: closes worker sessions whose reservations are over.

A ``reservation.close`` can be lost: the worker was down when it was sent, or the
broker that queued it stopped. Workers list their open sessions in every heartbeat
(``running`` items of kind ``reservation``); any session whose reservation is unknown,
ended, or held on another worker is closed again. So a worker never keeps a stale
session (and its slot, processes and container) for longer than a heartbeat or two.

A heartbeat is untrusted input, so the work it causes is bounded (issue 8, item 6): the
schema caps ``running`` (``worker.heartbeat.json``), all listed ids are checked in one
query (``Store.stale_sessions``), each stale session is told at most once per
``RESEND_AFTER_S``, and one worker gets at most ``MAX_CLOSES`` closes per
``RESEND_AFTER_S`` (a token bucket; the rest wait for later heartbeats). A worker
listing thousands of made-up ids costs the coordinator one query per heartbeat batch
and a trickle of messages, all into that worker's own inbox.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from broker.bus import Bus
from broker.rate_limit import TokenBuckets
from coordinator.store import Store
from schemas.messages import ReservationClose
from schemas.topics import Topics

log = logging.getLogger(__name__)

RESEND_AFTER_S = 10.0  # one close per stale session per this interval
MAX_CLOSES = 16  # closes per worker per RESEND_AFTER_S (burst), refilled evenly
MAX_IDS = 256  # reservation ids looked at per heartbeat (the schema's cap on running)
REASON_MAX = 1024
SENT_MAX = 10_000  # remembered (worker, session) pairs before old ones are pruned


class SessionReconciler:
    """Listens to heartbeats (``WorkerRegistry.heartbeat_listeners``)."""

    def __init__(self, bus: Bus, store: Store, topics: Topics,
                 clock: Callable[[], float] = time.time, *,
                 resend_after_s: float = RESEND_AFTER_S, max_closes: int = MAX_CLOSES) -> None:
        self.bus = bus
        self.store = store
        self.topics = topics
        self._clock = clock
        self.resend_after_s = resend_after_s
        self._sent: dict[tuple[str, str], float] = {}
        self._budget = TokenBuckets(max_closes / resend_after_s, max_closes, clock=clock)
        self.closes_sent = 0
        self.closes_deferred = 0

    def on_heartbeat(self, wid: str, running: list[dict[str, Any]]) -> None:
        rids = list(dict.fromkeys(
            str(item.get("id")) for item in running[:MAX_IDS]
            if isinstance(item, dict) and item.get("kind") == "reservation"))
        if not rids:
            return
        now = self._clock()
        due = [rid for rid in rids
               if now - self._sent.get((wid, rid), -self.resend_after_s) >= self.resend_after_s]
        if not due:
            return
        stale = self.store.stale_sessions(wid, due)
        # Least recently told first, so that a long list is worked through in turn.
        order = sorted(stale.items(), key=lambda item: self._sent.get((wid, item[0]), 0.0))
        deferred = 0
        for done, (rid, reason) in enumerate(order):
            if not self._budget.allow(wid):
                deferred = len(stale) - done
                break
            self._sent[(wid, rid)] = now
            log.info("worker %s still holds session %s (%s); closing it", wid, rid, reason)
            self.bus.send(self.topics.worker_inbox(wid),
                          ReservationClose(reservation=rid, reason=reason[:REASON_MAX]))
            self.closes_sent += 1
        if deferred:
            self.closes_deferred += deferred
            log.warning("worker %s lists %d stale sessions; %d close(s) deferred to later "
                        "heartbeats (at most %d per %gs)", wid, len(stale), deferred,
                        self._budget.burst, self.resend_after_s)
        if len(self._sent) > SENT_MAX:
            self._sent = {k: t for k, t in self._sent.items()
                          if now - t < self.resend_after_s}
