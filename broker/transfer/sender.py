"""The sending side: streams a file's segments with a window in flight, resends what was
not acknowledged, and finishes with ``xfer.fin``.

The sender keeps nothing of the file in memory but the window (it reads each segment by
offset when it sends it). Acknowledgements are cumulative ``have`` ranges; a segment
sent before one that is acknowledged, yet not acknowledged itself, was dropped by the
receiver (bad CRC, lost) and is resent at once (segments from one publisher reach the
receiver in order). When nothing is acknowledged for ``resend_after_s`` the sender asks
the receiver (``xfer.status``) and resends what it lacks; after ``stall_timeout_s``
without progress it gives up, and a later run with the same tid resumes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.transfer.errors import TransferError, TransferRefused, TransferStalled
from broker.transfer.ranges import ByteRanges
from broker.transfer.segments import crc32, segment_length, segment_offsets
from broker.transfer.settings import TransferSettings
from schemas.topics import Topics
from schemas.transfer_messages import XferFin, XferState, XferStatus

if TYPE_CHECKING:
    from broker.bus import Bus

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
HASH_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Peer:
    """The other end of a transfer: its principal (the authenticated sender of its
    acknowledgements) and its base inbox."""

    principal: str
    inbox: str

    @classmethod
    def coordinator(cls, topics: Topics, principal: str = "coordinator") -> Peer:
        return cls(principal, topics.coord_inbox)

    @classmethod
    def worker(cls, topics: Topics, wid: str) -> Peer:
        return cls(wid, topics.worker_inbox(wid))

    @classmethod
    def client(cls, topics: Topics, cid: str) -> Peer:
        return cls(cid, topics.client_inbox(cid))


@dataclass
class SendStats:
    """Counts of one outgoing transfer (tests count resends with them)."""

    sent: int = 0  # segments sent for the first time in this run
    resent: int = 0  # segments sent again (lost, refused, not acknowledged)
    status_asks: int = 0


class Outgoing:
    """One file being sent to one peer (see the module docstring).

    ``send_segment`` is the one place a segment leaves; a subclass may watch or alter it
    (tests corrupt or count segments there).
    """

    def __init__(self, bus: Bus, settings: TransferSettings, *, peer: Peer, xfer_base: str,
                 tid: str, path: Path, size: int, sha256: str, segment_size: int,
                 progress: Progress | None = None) -> None:
        self.bus = bus
        self.settings = settings
        self.peer = peer
        self.xfer_base = xfer_base  # the peer's transfer base
        self.tid = tid
        self.path = path
        self.size = size
        self.sha256 = sha256
        self.segment_size = segment_size
        self.progress = progress
        self.stats = SendStats()
        self._cond = threading.Condition()
        self._acked = ByteRanges()
        self._abort: TransferError | None = None
        self._fd: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.peer.principal, self.tid)

    # -- from the bus (inbox lane) -----------------------------------------------------

    def on_ack(self, have: ByteRanges) -> None:
        with self._cond:
            if self._acked.update(have):
                self._cond.notify_all()

    def abort(self, err: TransferError) -> None:
        with self._cond:
            self._abort = err
            self._cond.notify_all()

    def acked_bytes(self) -> int:
        with self._cond:
            return self._acked.total()

    # -- streaming (the caller's thread) ---------------------------------------------------

    def stream(self, todo: ByteRanges, acked: ByteRanges | None = None) -> None:
        """Send every segment of ``todo`` and return once all are acknowledged."""
        with self._cond:
            if acked is not None:
                self._acked.update(acked)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._stream(todo)
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _stream(self, todo: ByteRanges) -> None:
        s = self.settings
        pending: Iterator[int] = segment_offsets(todo, self.size, self.segment_size)
        resend: deque[int] = deque()
        inflight: dict[int, int] = {}  # offset -> send sequence number, in send order
        seq = 0
        newest_acked_seq = -1
        last_ack = time.monotonic()  # last time the acknowledged set grew
        last_ask = last_ack
        reported = -1
        while True:
            to_send: list[tuple[int, bool]] = []
            with self._cond:
                if self._abort is not None:
                    raise self._abort
                acked = self._acked
                for offset in [o for o in inflight if acked.covers(o, o + self._len(o))]:
                    newest_acked_seq = max(newest_acked_seq, inflight.pop(offset))
                    last_ack = time.monotonic()
                # Sent before something acknowledged, yet not acknowledged: dropped.
                for offset in [o for o, n in inflight.items() if n < newest_acked_seq]:
                    del inflight[offset]
                    resend.append(offset)
                while len(inflight) + len(to_send) < s.window:
                    found, again = self._next(resend, pending, acked)
                    if found is None:
                        break
                    to_send.append((found, again))
                done_bytes = acked.total()
                if not to_send and not inflight:  # _next found nothing left to send
                    self._report(done_bytes, reported)
                    return
                if not to_send:
                    now = time.monotonic()
                    quiet = now - max(last_ack, last_ask)
                    if quiet < s.resend_after_s:
                        self._cond.wait(min(s.resend_after_s - quiet, 0.5))
                        continue
            if done_bytes != reported:
                reported = self._report(done_bytes, reported)
            if to_send:
                for offset, again in to_send:
                    seq += 1
                    inflight[offset] = seq
                    self.send_segment(offset, again)
                continue
            # Nothing acknowledged for resend_after_s: ask what the receiver holds.
            if time.monotonic() - last_ack > s.stall_timeout_s:
                raise TransferStalled(
                    f"no progress sending {self.path.name} to {self.peer.principal} for "
                    f"{s.stall_timeout_s:.0f} s; run it again to resume")
            last_ask = time.monotonic()
            have = self.ask_status()
            if have is not None:
                self.on_ack(have)
                with self._cond:
                    acked = self._acked
                    for offset in list(inflight):
                        if not acked.covers(offset, offset + self._len(offset)):
                            del inflight[offset]
                            resend.append(offset)

    def _next(self, resend: deque[int], pending: Iterator[int],
              acked: ByteRanges) -> tuple[int | None, bool]:
        while resend:
            offset = resend.popleft()
            if not acked.covers(offset, offset + self._len(offset)):
                return offset, True
        for offset in pending:
            if not acked.covers(offset, offset + self._len(offset)):
                return offset, False
        return None, False

    def _len(self, offset: int) -> int:
        return segment_length(offset, self.size, self.segment_size) or 0

    def _report(self, done: int, reported: int) -> int:
        if self.progress is not None and done != reported:
            try:
                self.progress(min(done, self.size), self.size)
            except Exception:
                log.exception("progress callback failed")
        return done

    def send_segment(self, offset: int, again: bool) -> None:
        """Read the segment at ``offset`` and publish it (QoS 1)."""
        assert self._fd is not None
        length = self._len(offset)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise TransferError(f"{self.path} changed while it was being sent "
                                f"(short read at {offset})", "conflict")
        self.publish(offset, data, crc32(data))
        if again:
            self.stats.resent += 1
        else:
            self.stats.sent += 1

    def publish(self, offset: int, data: bytes, crc: int) -> None:
        topic = Topics.xfer_segment(self.xfer_base, self.bus.principal, self.tid, offset, crc)
        self.bus.publish_bytes(topic, data, qos=1)

    # -- control ----------------------------------------------------------------------

    def ask_status(self) -> ByteRanges | None:
        """The receiver's durable ranges; None when it did not answer in time."""
        from broker.bus import RemoteError, RequestTimeout

        self.stats.status_asks += 1
        try:
            reply = self.bus.request(self.peer.inbox, XferStatus(tid=self.tid),
                                     timeout=self.settings.request_timeout_s)
        except RequestTimeout:
            return None
        except RemoteError as err:
            raise TransferRefused(err.code, f"{self.peer.principal}: {err.error.message}") \
                from None
        return self.ranges_of(reply.body)

    def ranges_of(self, state: Any) -> ByteRanges:
        if not isinstance(state, XferState) or state.tid != self.tid:
            raise TransferError(f"{self.peer.principal} answered with something else than "
                                f"the state of {self.tid}", "invalid")
        if state.state == "complete":
            return ByteRanges.whole(self.size)
        try:
            return ByteRanges.from_wire(state.have or [], self.size)
        except ValueError as err:
            raise TransferError(f"{self.peer.principal} sent bad ranges: {err}",
                                "invalid") from None

    def finish(self) -> dict[str, Any]:
        """``xfer.fin`` until the receiver says complete; resend what it says it lacks."""
        from broker.bus import RemoteError, RequestTimeout

        started = time.monotonic()
        while True:
            with self._cond:
                if self._abort is not None:
                    raise self._abort
            try:
                reply = self.bus.request(
                    self.peer.inbox, XferFin(tid=self.tid, size=self.size, sha256=self.sha256),
                    timeout=self.settings.request_timeout_s)
            except RequestTimeout:
                if time.monotonic() - started > self.settings.stall_timeout_s:
                    raise TransferStalled(f"{self.peer.principal} did not confirm "
                                          f"{self.path.name}; run it again to resume") from None
                continue
            except RemoteError as err:
                raise TransferRefused(err.code, f"{self.peer.principal}: "
                                      f"{err.error.message}") from None
            state: XferState = reply.body
            if isinstance(state, XferState) and state.state == "complete":
                return dict(state.ref or {})
            have = self.ranges_of(state)
            missing = have.missing(self.size)
            log.info("%s still lacks %d bytes of %s; resending", self.peer.principal,
                     missing.total(), self.tid)
            self.stream(missing, have)
            started = time.monotonic()
