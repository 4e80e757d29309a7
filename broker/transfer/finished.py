"""What the receiver remembers of transfers that ended.

Apart from ``receiver.py`` because it is bookkeeping, not message handling: finished
uploads are kept ``keep_done_s`` (and at most ``max_done``) so that a repeated init,
status or fin is answered "complete" instead of starting over, and the counters of the
last ``max_done`` ended transfers stay readable (tests, benchmarks).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from broker.transfer.inbound import Key, ReceiveStats
from broker.transfer.settings import TransferSettings
from broker.transfer.state import TransferRecord
from broker.transfer.storage import Sink

log = logging.getLogger("broker.transfer.receiver")  # logs as the receiver did


class FinishedTransfers:
    """Finished uploads by (peer, tid), oldest first, and ended transfers' counters.

    Not locked itself: the receiver's lock covers every call.
    """

    def __init__(self, settings: TransferSettings) -> None:
        self.settings = settings
        self._done: OrderedDict[Key, tuple[TransferRecord, Sink, float]] = OrderedDict()
        self._stats: OrderedDict[Key, ReceiveStats] = OrderedDict()

    def record(self, key: Key) -> TransferRecord | None:
        """The record of a finished upload still remembered, if any."""
        done = self._done.get(key)
        return done[0] if done is not None else None

    def remember(self, record: TransferRecord, sink: Sink, expires: float) -> None:
        """Keep ``record`` until the wall-clock ``expires``; forget the oldest beyond
        ``max_done``."""
        self._done[record.key] = (record, sink, expires)
        while len(self._done) > self.settings.max_done:
            key, (old, old_sink, _) = next(iter(self._done.items()))
            self._forget(key, old, old_sink)

    def expire(self, wall: float) -> None:
        """Forget the finished uploads kept long enough (and drop their saved state)."""
        for key, (record, sink, expires) in list(self._done.items()):
            if wall >= expires:
                self._forget(key, record, sink)

    def _forget(self, key: Key, record: TransferRecord, sink: Sink) -> None:
        self._done.pop(key, None)
        try:
            sink.drop_state(record)
        except Exception:
            log.exception("storage could not drop finished transfer %s", record.tid)

    def keep_stats(self, key: Key, stats: ReceiveStats) -> None:
        self._stats[key] = stats
        while len(self._stats) > self.settings.max_done:
            self._stats.popitem(last=False)

    def stats(self, key: Key) -> ReceiveStats | None:
        return self._stats.get(key)
