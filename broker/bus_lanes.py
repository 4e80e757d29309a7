"""The bus's lanes: one thread and queue per ``Lane``, where handlers run.

Apart from ``broker/bus.py`` because it is the bus's threading: paho calls back on its
network thread, which must never block, so every message is queued to a lane and handled
there, in order within the lane. A lane's thread starts with its first use and ends when
the bus stops; once the bus is stopping no thread starts any more.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from broker.bus_types import Handler, Incoming, Lane
from broker.subscriptions import Subscription

log = logging.getLogger("broker.bus")  # a failing handler logs as the bus did

LaneItem = tuple[Subscription, Any]  # (where it goes, a paho message or one of ours)


@dataclass
class LaneThread:
    """One lane: its queue and the thread that drains it (None: never started)."""

    name: Lane
    queue: queue.Queue[LaneItem | None] = field(default_factory=queue.Queue)
    thread: threading.Thread | None = None


class Prevalidated:
    """An inbox message already decoded once, moved to another lane."""

    def __init__(self, incoming: Incoming) -> None:
        self.incoming = incoming
        self.topic = incoming.topic


HOOK_MARKER: Any = object()  # queued on the connect lane: run the on-connect hooks


class Lanes:
    """The lanes of one bus, by name.

    ``run_hooks`` runs the bus's on-connect hooks and ``deliver`` decodes, validates and
    hands on a paho message; both run on the lane, never on paho's network thread.
    """

    def __init__(self, owner: str, *, run_hooks: Callable[[], None],
                 deliver: Callable[[Subscription, mqtt.MQTTMessage], None]) -> None:
        self._owner = owner  # names the threads: bus-<owner>-<lane>
        self._run_hooks = run_hooks
        self._deliver = deliver
        self._lanes: dict[Lane, LaneThread] = {}
        self._lock = threading.Lock()
        self._closed = False

    def lane(self, name: Lane) -> LaneThread:
        """The lane ``name``, its thread started on first use. Once closed no thread
        starts: an inbox message still being dispatched when ``stop`` took its list of
        lanes would otherwise start one that nothing ever ends."""
        with self._lock:
            lane = self._lanes.get(name)
            if lane is None and self._closed:
                return LaneThread(name)  # no thread: what is put there is dropped with the bus
            if lane is None:
                lane = LaneThread(name)
                lane.thread = threading.Thread(
                    target=self._run_lane, args=(lane,), name=f"bus-{self._owner}-{name}",
                    daemon=True,
                )
                self._lanes[name] = lane
                lane.thread.start()
            return lane

    def put(self, sub: Subscription, msg: Any) -> None:
        """Queue ``msg`` on the lane of ``sub``."""
        self.lane(sub.lane).queue.put((sub, msg))

    def put_hooks(self) -> None:
        """Run the on-connect hooks soon, on the connect lane."""
        self.put(Subscription("", 0, Lane.CONNECT), HOOK_MARKER)

    def put_incoming(self, lane: Lane, handler: Handler, incoming: Incoming) -> None:
        """Hand an already decoded inbox message to ``handler`` on ``lane``."""
        self.put(Subscription("", 0, lane, handler=handler), Prevalidated(incoming))

    def backlog(self, name: Lane) -> int:
        """Messages queued but not yet handled on ``name`` (0 for an unknown lane)."""
        found = self._lanes.get(name)
        return found.queue.qsize() if found else 0

    def close(self) -> None:
        """Start no more threads (the bus is stopping)."""
        with self._lock:
            self._closed = True

    def stop(self, join_s: float = 5) -> None:
        """Close, tell every lane to end after what it holds, and wait for them."""
        with self._lock:
            self._closed = True
            lanes = list(self._lanes.values())
        for lane in lanes:
            lane.queue.put(None)
        for lane in lanes:
            if lane.thread and lane.thread is not threading.current_thread():
                lane.thread.join(join_s)

    def _run_lane(self, lane: LaneThread) -> None:  # the name bench/heartbeat_ingest.py looks for
        while True:
            item = lane.queue.get()
            if item is None:
                return
            sub, msg = item
            try:
                if msg is HOOK_MARKER:
                    self._run_hooks()
                elif isinstance(msg, Prevalidated):
                    assert sub.handler is not None
                    sub.handler(msg.incoming)
                elif sub.raw_handler is not None:
                    sub.raw_handler(msg.topic, msg.payload, bool(msg.retain))
                else:
                    self._deliver(sub, msg)
            except Exception:
                log.exception("handler for %s failed", getattr(msg, "topic", "?"))
