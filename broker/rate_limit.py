"""Token buckets per key: how every component limits what one principal may make it do.

One bucket per key (a principal id): ``burst`` requests at once, then ``rate`` per
second. The coordinator's request guard (coordinator/handling.py), the worker's
(worker/request_guard.py), the reconciler's corrections (coordinator/reconcile.py) and
the embedded broker's ``broker.recheck`` consumer (broker/revocation.py) all use it, so a
limit means the same thing everywhere. Keys are authenticated principal ids, which only
an admin can create; the table is still bounded (``max_keys``): when it is full, buckets
that have refilled completely (they hold nothing a fresh bucket would not) are dropped
first, then everything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBuckets:
    """A token bucket per key; ``rate <= 0`` means no limit at all.

    Thread-safe: handlers on several bus lanes share one instance.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 4096,
    ) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self._clock = clock
        self._max_keys = max(1, int(max_keys))
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def take(self, key: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens from ``key``'s bucket: 0.0 when granted, else the seconds
        until that many tokens are back (nothing is taken then)."""
        if self.unlimited:
            return 0.0
        cost = min(float(cost), float(self.burst))
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
            if tokens < cost:
                self._buckets[key] = (tokens, now)
                return (cost - tokens) / self.rate
            if key not in self._buckets and len(self._buckets) >= self._max_keys:
                self._evict(now)
            self._buckets[key] = (tokens - cost, now)
            return 0.0

    def allow(self, key: str) -> bool:
        """Take one token; False when ``key``'s bucket is empty."""
        return self.take(key) == 0.0

    def forget(self, key: str) -> None:
        with self._lock:
            self._buckets.pop(key, None)

    def __len__(self) -> int:
        return len(self._buckets)

    def _evict(self, now: float) -> None:
        full = [k for k, (tokens, at) in self._buckets.items()
                if tokens + (now - at) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self._max_keys:
            self._buckets.clear()
