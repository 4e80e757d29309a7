"""A component's transfer endpoint: both ends of the protocol on one ``Bus``.

Uploads: ``upload(peer, path, purpose=...)`` offers a file (``xfer.init``), streams what
the receiver lacks and finishes (``xfer.fin``). Downloads: ``download(peer, source,
dest)`` asks the holder to describe the file (``xfer.fetch`` without ranges), gets ready
to receive it, then asks for the missing ranges, again after a holder restart or when a
list had to be cut short; the holder's endpoint streams them with the same sender
machinery (the same protocol reversed). Incoming uploads go to the ``sink``; fetches
read what the ``source`` allows.

Create the endpoint before ``bus.start()``: it registers the ``xfer.*`` inbox handlers
and subscribes to its transfer topics, and the bus acknowledges subscriptions before it
reports itself connected. ``upload``/``download`` block the calling thread: call them
from your own thread, never from a bus handler.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.bus import Lane, RemoteError, RequestTimeout
from broker.transfer.errors import (
    TransferAborted,
    TransferError,
    TransferRefused,
    TransferStalled,
    wire_code,
)
from broker.transfer.inbound import sender_inbox
from broker.transfer.ranges import ByteRanges
from broker.transfer.receiver import Receiver
from broker.transfer.segments import (
    bitmap_to_ranges,
    new_tid,
    segment_ranges,
    valid_sha256,
    valid_tid,
)
from broker.transfer.sender import Outgoing, Peer, Progress, file_sha256
from broker.transfer.settings import TransferSettings
from broker.transfer.state import TransferPhase, TransferRecord
from broker.transfer.storage import FileDownloadSink, Sink, Source, SourceFile
from schemas.messages import Body, Ok
from schemas.topics import Topics
from schemas.transfer_messages import XferAbort, XferAck, XferFetch, XferInit, XferState

if TYPE_CHECKING:
    from broker.bus import Bus, Incoming

log = logging.getLogger(__name__)

Key = tuple[str, str]
WAIT_STEP_S = 0.2  # how often a download looks at its progress


@dataclass(frozen=True)
class TransferResult:
    """How a transfer ended: what the receiving side made of it (``ref``) and counts."""

    tid: str
    size: int
    sha256: str
    ref: dict[str, Any] = field(default_factory=dict)
    held_already: bool = False  # the receiver had the content: nothing moved
    sent: int = 0  # segments sent (uploads)
    resent: int = 0
    elapsed_s: float = 0.0


class TransferEndpoint:
    """Both ends of the transfer protocol for one bus (see the module docstring)."""

    outgoing_type: type[Outgoing] = Outgoing  # a subclass may watch or alter segments

    def __init__(self, bus: Bus, *, sink: Sink | None = None, source: Source | None = None,
                 settings: TransferSettings | None = None) -> None:
        if not bus.inbox:
            raise TransferError("a transfer endpoint needs a bus with an inbox", "invalid")
        self.bus = bus
        self.settings = settings or TransferSettings()
        self.topics: Topics = bus.topics
        self.xfer_base = self.topics.xfer_for_inbox(bus.inbox)
        self.source = source
        self.receiver = Receiver(bus, self.settings, sink, self.xfer_base)
        self._lock = threading.Lock()
        self._outgoing: dict[Key, Outgoing] = {}  # uploads this side runs
        self._streams: dict[Key, Outgoing] = {}  # downloads this side serves
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        for mtype, handler in (("xfer.init", self.receiver.on_init),
                               ("xfer.status", self.receiver.on_status),
                               ("xfer.fin", self.receiver.on_fin),
                               ("xfer.abort", self._on_abort),
                               ("xfer.fetch", self._on_fetch)):
            bus.on_inbox(mtype, handler, lane=Lane.TRANSFER)
        bus.on_inbox("xfer.ack", self._on_ack, lane=Lane.INBOX)  # cheap: wakes a sender
        bus.subscribe_raw(Topics.xfer_filter(self.xfer_base), self.receiver.on_segment,
                          qos=1, lane=Lane.TRANSFER)
        self.receiver.start()

    def close(self) -> None:
        """Stop sending and receiving; unfinished transfers stay resumable."""
        with self._lock:
            self._closed = True
            running = [*self._outgoing.values(), *self._streams.values()]
            pool, self._pool = self._pool, None
        for out in running:
            out.abort(TransferAborted("the transfer endpoint closed"))
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(Exception):
            self.bus.unsubscribe(Topics.xfer_filter(self.xfer_base))
        self.receiver.close()

    def __enter__(self) -> TransferEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- uploads -------------------------------------------------------------------------

    def upload(self, peer: Peer, path: str | Path, *, purpose: dict[str, Any],
               name: str | None = None, sha256: str | None = None, tid: str | None = None,
               progress: Progress | None = None) -> TransferResult:
        """Send the file at ``path`` to ``peer``; return once it verified and stored it.

        Re-running with the same ``tid`` after a crash resumes: only what the receiver
        does not hold yet is sent. ``sha256`` saves hashing the file when known.
        """
        path = Path(path)
        try:
            size = path.stat().st_size
            digest = sha256 or file_sha256(path)
        except OSError as err:
            raise TransferError(f"cannot read {path}: {err.strerror or err}", "not_found") \
                from err
        tid = tid or new_tid()
        if not valid_tid(tid) or not valid_sha256(digest):
            raise TransferError("tid or sha256 malformed", "invalid")
        seg = self.settings.segment_size
        out = self.outgoing_type(self.bus, self.settings, peer=peer,
                                 xfer_base=self.topics.xfer_for_inbox(peer.inbox), tid=tid,
                                 path=path, size=size, sha256=digest, segment_size=seg,
                                 progress=progress)
        self._register(self._outgoing, out)
        started = time.monotonic()
        try:
            reply = self._request(peer, XferInit(
                tid=tid, direction="upload", name=(name or path.name or "file")[:255],
                size=size, sha256=digest, segment_size=seg, purpose=purpose))
            state = reply if isinstance(reply, XferState) else None
            if state is None or state.tid != tid:
                raise TransferError(f"{peer.principal} answered xfer.init with "
                                    f"{reply.TYPE}", "invalid")
            if state.state == "complete":
                if progress is not None:
                    progress(size, size)
                return TransferResult(tid, size, digest, dict(state.ref or {}), True,
                                      elapsed_s=time.monotonic() - started)
            have = out.ranges_of(state)
            out.stream(have.missing(size), have)
            ref = out.finish()
        finally:
            self._unregister(self._outgoing, out)
        return TransferResult(tid, size, digest, ref, False, out.stats.sent, out.stats.resent,
                              time.monotonic() - started)

    def abort(self, peer: Peer, tid: str, reason: str = "aborted") -> None:
        """End a transfer with ``peer``, whichever way it goes; the peer is told."""
        key = (peer.principal, tid)
        with self._lock:
            out = self._outgoing.get(key) or self._streams.get(key)
        if out is not None:
            out.abort(TransferAborted(reason))
        with contextlib.suppress(RemoteError, RequestTimeout):
            self.bus.request(peer.inbox, XferAbort(tid=tid, reason=reason[:256] or "aborted"),
                             timeout=self.settings.request_timeout_s)

    # -- downloads -------------------------------------------------------------------------

    def download(self, peer: Peer, source: dict[str, Any], dest: str | Path, *,
                 tid: str | None = None, sink: Sink | None = None,
                 expected_sha256: str | None = None,
                 progress: Progress | None = None) -> TransferResult:
        """Fetch what ``source`` names from ``peer`` into ``dest`` (or into ``sink``).

        The file is verified (size and SHA-256 the holder announced, and
        ``expected_sha256`` when given) before it replaces ``dest``. An interrupted
        download resumes when run again: its state waits beside ``dest``.
        """
        sink = sink or FileDownloadSink(dest, expected_sha256=expected_sha256,
                                        max_size=self.settings.max_size)
        started = time.monotonic()
        record = self._earlier_download(sink, peer, source, tid)
        tid = record.tid if record is not None else (tid or new_tid())
        desc = self._describe(peer, tid, source)
        if expected_sha256 and desc.sha256 != expected_sha256:
            raise TransferRefused("conflict", f"{peer.principal} holds other content than "
                                  f"{expected_sha256[:12]}…")
        if record is not None and (record.size, record.sha256, record.segment_size) != (
                desc.size, desc.sha256, desc.segment_size):
            sink.drop_state(record)  # the holder's file changed: start over
            with contextlib.suppress(OSError):
                sink.partial_path(record).unlink()
            record = None
        if record is None:
            record = TransferRecord(tid=tid, peer=peer.principal, peer_inbox=peer.inbox,
                                    direction="download", name=desc.name, size=desc.size,
                                    sha256=desc.sha256, segment_size=desc.segment_size,
                                    purpose=dict(source))
        t = self.receiver.expect(record, sink)
        if t is None:
            return TransferResult(tid, record.size, record.sha256, dict(record.ref or {}), True,
                                  elapsed_s=time.monotonic() - started)
        self.receiver.finish_if_complete(t)
        size = record.size
        last_done, last_progress = -1, time.monotonic()
        try:
            while not t.finished.is_set():
                missing = self.receiver.missing(t)
                pairs, _ = missing.to_wire(self.settings.max_wire_ranges)
                asked = ByteRanges(pairs)
                again = self._describe(peer, tid, source, ranges=pairs)
                if (again.size, again.sha256) != (size, record.sha256):
                    raise TransferRefused("conflict", f"{record.name} changed on "
                                          f"{peer.principal} during the download")
                asked_at = time.monotonic()
                while not t.finished.wait(WAIT_STEP_S):
                    lacking = self.receiver.missing(t)
                    done = size - lacking.total()
                    now = time.monotonic()
                    if done != last_done:
                        if progress is not None:
                            progress(done, size)
                        last_done, last_progress = done, now
                    if not lacking.intersection(asked):
                        break  # what we asked for is here; ask for the rest
                    if now - last_progress > self.settings.stall_timeout_s:
                        raise TransferStalled(f"no data from {peer.principal} for "
                                              f"{self.settings.stall_timeout_s:.0f} s; run "
                                              "it again to resume")
                    if now - max(last_progress, asked_at) > 2 * self.settings.resend_after_s:
                        break  # the holder went quiet (restarted?): ask again
        except TransferError as err:
            if not isinstance(err, TransferStalled):
                self.receiver.drop(t, err)
            raise
        if t.error is not None:
            raise t.error
        if progress is not None and last_done != size:
            progress(size, size)
        return TransferResult(tid, size, record.sha256, dict(t.record.ref or {}), False,
                              elapsed_s=time.monotonic() - started)

    def _earlier_download(self, sink: Sink, peer: Peer, source: dict[str, Any],
                          tid: str | None) -> TransferRecord | None:
        """An unfinished download of the same thing from the same peer, to resume."""
        for record in sink.load_states():
            if (record.direction == "download" and record.peer == peer.principal
                    and record.phase is TransferPhase.RECEIVING
                    and (record.tid == tid if tid else record.purpose == source)):
                return record
        return None

    def _describe(self, peer: Peer, tid: str, source: dict[str, Any],
                  ranges: list[list[int]] | None = None) -> XferInit:
        reply = self._request(peer, XferFetch(tid=tid, source=source, ranges=ranges))
        if not isinstance(reply, XferInit) or reply.tid != tid or reply.direction != "download":
            raise TransferError(f"{peer.principal} answered xfer.fetch with {reply.TYPE}",
                                "invalid")
        self.receiver.check_description(reply)
        return reply

    # -- serving downloads (holder side) --------------------------------------------------

    def _on_fetch(self, incoming: Incoming) -> None:
        body: XferFetch = incoming.body
        requester = incoming.sender
        if requester is None:
            return
        try:
            if self.source is None:
                raise TransferRefused("unsupported", f"{self.bus.principal or 'this side'} "
                                      "serves no downloads")
            peer_inbox = sender_inbox(self.topics, incoming, requester)
            found = self.source.open_fetch(requester, dict(body.source))
            self._check_source(found)
            ranges = self._requested(body, found)
            key = (requester, body.tid)
            if ranges:
                self._check_streams(requester, key)
        except TransferError as err:
            self.bus.reply_error(incoming, wire_code(err), str(err)[:4096])
            return
        seg = self.settings.segment_size
        self.bus.reply(incoming, XferInit(
            tid=body.tid, direction="download", name=(found.name or "file")[:255],
            size=found.size, sha256=found.sha256, segment_size=seg,
            purpose=dict(body.source)))
        if ranges:
            self._serve(Peer(requester, peer_inbox), body.tid, found,
                        segment_ranges(ranges, found.size, seg))

    @staticmethod
    def _check_source(found: SourceFile) -> None:
        if found.size < 0 or not valid_sha256(found.sha256):
            raise TransferError("the holder's storage described the file wrongly", "internal")

    def _requested(self, body: XferFetch, found: SourceFile) -> ByteRanges | None:
        try:
            if body.ranges is not None:
                return ByteRanges.from_wire(body.ranges, found.size)
            if body.bitmap is not None:
                return bitmap_to_ranges(body.bitmap, found.size, self.settings.segment_size)
        except ValueError as err:
            raise TransferRefused("invalid", f"bad ranges: {err}") from None
        return None

    def _check_streams(self, requester: str, key: Key) -> None:
        with self._lock:
            others = [k for k in self._streams if k != key]
            mine = sum(1 for k in others if k[0] == requester)
            if mine >= self.settings.max_streams_per_peer:
                raise TransferRefused("busy", f"{requester} already has {mine} downloads "
                                      "streaming from here")
            if len(others) >= self.settings.max_streams:
                raise TransferRefused("busy", "too many downloads streaming from here; "
                                      "try again later")

    def _serve(self, peer: Peer, tid: str, found: SourceFile, todo: ByteRanges) -> None:
        out = self.outgoing_type(self.bus, self.settings, peer=peer,
                                 xfer_base=self.topics.xfer_for_inbox(peer.inbox), tid=tid,
                                 path=found.path, size=found.size, sha256=found.sha256,
                                 segment_size=self.settings.segment_size)
        with self._lock:
            if self._closed:
                return
            old = self._streams.get(out.key)
            if old is not None:
                old.abort(TransferAborted("replaced by a newer fetch"))
            self._streams[out.key] = out
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.settings.max_streams,
                    thread_name_prefix=f"xfer-serve-{self.bus.client_id}")
            pool = self._pool
        pool.submit(self._run_stream, out, todo)

    def _run_stream(self, out: Outgoing, todo: ByteRanges) -> None:
        try:
            out.stream(todo)
        except TransferAborted:
            pass
        except (TransferError, OSError) as err:
            log.info("stopped streaming %s to %s: %s", out.tid, out.peer.principal, err)
        except Exception:
            log.exception("streaming %s to %s failed", out.tid, out.peer.principal)
        finally:
            self._unregister(self._streams, out)

    # -- inbox handlers ------------------------------------------------------------------

    def _on_ack(self, incoming: Incoming) -> None:
        body: XferAck = incoming.body
        key = (incoming.sender or "", body.tid)
        with self._lock:
            out = self._outgoing.get(key) or self._streams.get(key)
        if out is None:
            return  # late, or not ours: acks are advisory
        try:
            have = ByteRanges.from_wire(body.have, out.size)
        except ValueError as err:
            log.warning("ignored an ack from %s for %s: %s", key[0], body.tid, err)
            return
        out.on_ack(have)

    def _on_abort(self, incoming: Incoming) -> None:
        if self.receiver.on_abort(incoming):
            return
        key = (incoming.sender or "", incoming.body.tid)
        with self._lock:
            out = self._outgoing.get(key) or self._streams.get(key)
        if out is None:
            self.bus.reply_error(incoming, "not_found",
                                 f"no transfer {incoming.body.tid} with you here")
            return
        reason = incoming.body.reason or "aborted"
        out.abort(TransferAborted(f"{key[0]} aborted the transfer: {reason}"))
        self.bus.reply(incoming, Ok())

    # -- helpers ----------------------------------------------------------------------------

    def _request(self, peer: Peer, body: Body) -> Body:
        """A request that survives a slow or restarting peer (retried until stalled);
        an error reply becomes ``TransferRefused`` with the peer's code and words."""
        started = time.monotonic()
        while True:
            try:
                reply = self.bus.request(peer.inbox, body,
                                         timeout=self.settings.request_timeout_s)
            except RequestTimeout:
                if time.monotonic() - started > self.settings.stall_timeout_s:
                    raise TransferStalled(f"{peer.principal} does not answer {body.TYPE}; "
                                          "is it running?") from None
                continue
            except RemoteError as err:
                raise TransferRefused(err.code, f"{peer.principal}: {err.error.message}") \
                    from None
            result: Body = reply.body
            return result

    def _register(self, table: dict[Key, Outgoing], out: Outgoing) -> None:
        with self._lock:
            if self._closed:
                raise TransferAborted("the transfer endpoint is closed")
            if out.key in table:
                raise TransferRefused("conflict", f"transfer {out.tid} to "
                                      f"{out.peer.principal} is already running")
            table[out.key] = out

    def _unregister(self, table: dict[Key, Outgoing], out: Outgoing) -> None:
        with self._lock:
            if table.get(out.key) is out:
                del table[out.key]
