"""One incoming transfer's run-time state (``Inbound``), the receiver's counters, and the
rule for where its control messages go; apart from ``receiver.py``, which drives them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from broker.transfer.errors import TransferError, TransferRefused
from broker.transfer.state import TransferRecord
from broker.transfer.storage import Sink
from schemas.topics import Topics
from schemas.transfer_messages import XferInit, XferState

if TYPE_CHECKING:
    from broker.bus import Incoming

log = logging.getLogger("broker.transfer.receiver")

Key = tuple[str, str]  # (peer, tid)
DROP_LOG_S = 5.0  # at most one "dropped segments" warning per this many seconds


@dataclass
class ReceiveStats:
    """Counts of one incoming transfer (tests and benchmarks read them)."""

    received: int = 0  # segments written
    duplicates: int = 0  # segments already held (replays, resends)
    acks: int = 0


class Inbound:
    """One incoming transfer at run time: its record, sink, file and hash state."""

    def __init__(self, record: TransferRecord, sink: Sink, path: Path) -> None:
        self.record = record
        self.sink = sink
        self.path = path
        self.have = record.ranges()
        self.fd: int | None = None
        self.hasher = hashlib.sha256()
        self.hashed_to = 0
        self.unsynced = 0  # segments written since the last acknowledgement
        self.ack_due: float | None = None  # when the timer sends the pending ack
        self.touched = time.monotonic()
        self.stats = ReceiveStats()
        self.finished = threading.Event()  # complete, failed or aborted (local waiters)
        self.error: TransferError | None = None

    @property
    def key(self) -> Key:
        return self.record.key

    def done_bytes(self) -> int:
        return self.have.total()


class DropLog:
    """Counts dropped segments by reason and logs them rate-limited (a hostile or
    confused sender must not flood the log)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._last = 0.0

    def drop(self, reason: str, topic: str) -> None:
        self.counts[reason] += 1
        self._pending[reason] += 1
        now = time.monotonic()
        if now - self._last >= DROP_LOG_S:
            summary = ", ".join(f"{n} {r}" for r, n in sorted(self._pending.items()))
            log.warning("dropped transfer segments (%s); latest on %.200s", summary, topic)
            self._pending.clear()
            self._last = now


def sender_inbox(topics: Topics, incoming: Incoming, sender: str) -> str:
    """Where messages for ``sender`` go: its own base inbox (its reply_to) or the
    coordinator's; anything else would let it aim our acknowledgements at a third party."""
    reply_to = incoming.message.reply_to
    if reply_to and topics.is_inbox(reply_to):
        rest = topics.split(reply_to) or []
        if rest == ["coord", "inbox"] or (len(rest) == 3 and rest[1] == sender):
            return reply_to
    raise TransferRefused("invalid", "reply_to must be the sender's own inbox")


def same_file(record: TransferRecord, body: XferInit) -> bool:
    return (record.name, record.size, record.sha256, record.segment_size,
            record.purpose) == (body.name, body.size, body.sha256, body.segment_size,
                                dict(body.purpose))


def complete_state(record: TransferRecord) -> XferState:
    return XferState(tid=record.tid, state="complete", size=record.size, ref=record.ref)

