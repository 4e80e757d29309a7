"""The bus's subscriptions and which one a topic belongs to.

Apart from ``broker/bus.py`` because matching is its own concern: paho's matcher builds a
tree on every call (a fifth of the coordinator's heartbeat cost once), so matches are
cached per topic, and the cache is bounded (transfer segments make a new topic each).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from broker.bus_types import Handler, Lane, RawHandler

MATCH_CACHE_MAX = 100_000  # topics remembered by the matcher


@dataclass
class Subscription:
    topic_filter: str
    qos: int
    lane: Lane
    handler: Handler | None = None
    raw_handler: RawHandler | None = None
    types: frozenset[str] | None = None  # accepted message types (None: any)


class SubscriptionTable:
    """Subscriptions by topic filter; ``match`` is safe from the network thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, Subscription] = {}
        self._cache: dict[str, Subscription] = {}

    def add(self, sub: Subscription) -> None:
        with self._lock:
            self._subs[sub.topic_filter] = sub
            self._cache.clear()

    def remove(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
            self._cache.clear()

    def all(self) -> list[Subscription]:
        with self._lock:
            return list(self._subs.values())

    def match(self, topic: str) -> Subscription | None:
        """The subscription ``topic`` belongs to (an exact filter first), or None."""
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        with self._lock:
            sub = self._subs.get(topic)
            if sub is None:
                for candidate in self._subs.values():
                    if mqtt.topic_matches_sub(candidate.topic_filter, topic):
                        sub = candidate
                        break
            if sub is not None:
                if len(self._cache) >= MATCH_CACHE_MAX:
                    self._cache.clear()
                self._cache[topic] = sub
        return sub
