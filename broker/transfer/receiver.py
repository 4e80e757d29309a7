"""The receiving side: validates segments at the edge, writes them at their offset, makes
them durable before acknowledging, hashes incrementally, and hands the verified file to
its ``Sink``.

Everything here runs on the bus's transfer lane (segments and control messages share it,
so they are handled in arrival order), except the acknowledgement timer, a small thread
that sends the acknowledgement a segment left waiting ``ack_delay_s``. One lock covers
the receiver's state. Memory per transfer is a file descriptor, a SHA-256 state and at
most ``max_gaps`` ranges, whatever the file size. The file itself (offset writes, hash)
is ``partial_file.py``; what is remembered of ended transfers is ``finished.py``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from broker.transfer import partial_file
from broker.transfer.errors import TransferAborted, TransferError, TransferRefused, wire_code
from broker.transfer.finished import FinishedTransfers
from broker.transfer.inbound import (
    DropLog,
    Inbound,
    Key,
    ReceiveStats,
    complete_state,
    same_file,
    sender_inbox,
)
from broker.transfer.ranges import ByteRanges
from broker.transfer.segments import (
    crc32,
    parse_segment_topic,
    segment_length,
    valid_sha256,
)
from broker.transfer.settings import TransferSettings
from broker.transfer.state import TransferPhase, TransferRecord
from broker.transfer.storage import Offer, Sink
from schemas.messages import Ok
from schemas.transfer_messages import XferAbort, XferAck, XferFin, XferInit, XferState

if TYPE_CHECKING:
    from broker.bus import Bus, Incoming

log = logging.getLogger(__name__)

SWEEP_S = 30.0  # how often idle transfers and aged-out finished ones are looked for


class Receiver:
    """The incoming transfers of one endpoint (see the module docstring).

    ``sink`` receives uploads offered with ``xfer.init``; downloads this side fetched
    bring their own sink (``expect``). Without a sink, uploads are refused.
    """

    def __init__(self, bus: Bus, settings: TransferSettings, sink: Sink | None,
                 xfer_base: str) -> None:
        self.bus = bus
        self.settings = settings
        self.sink = sink
        self.xfer_base = xfer_base
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._active: dict[Key, Inbound] = {}
        self._finished = FinishedTransfers(settings)
        self._drops = DropLog()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._next_sweep = time.monotonic() + SWEEP_S

    @property
    def rejected(self) -> Counter[str]:
        """Dropped segments by reason (``unknown``, ``crc``, ``length``, ``offset``, ...)."""
        return self._drops.counts

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Resume what the sink kept and start the acknowledgement timer."""
        if self.sink is not None:
            for record in self.sink.load_states():
                try:
                    self._adopt(record, self.sink)
                except (OSError, ValueError) as err:
                    log.warning("cannot resume transfer %s from %s: %s", record.tid,
                                record.peer, err)
        self._thread = threading.Thread(target=self._run_timer, daemon=True,
                                        name=f"xfer-ack-{self.bus.client_id}")
        self._thread.start()

    def close(self) -> None:
        """Stop the timer and close files; states stay for the next start."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            for t in self._active.values():
                partial_file.close(t)
                t.error = t.error or TransferAborted("the receiving side stopped")
                t.finished.set()
            self._active.clear()  # whatever still arrives is dropped as unknown
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _adopt(self, record: TransferRecord, sink: Sink) -> None:
        """Take a record saved before a restart back into service."""
        now = time.time()
        if record.phase is TransferPhase.COMPLETE:
            if record.direction == "upload" and now < record.updated_at + self.settings.keep_done_s:
                with self._lock:
                    self._finished.remember(record, sink,
                                            record.updated_at + self.settings.keep_done_s)
            else:
                sink.drop_state(record)
            return
        if record.phase is not TransferPhase.RECEIVING:
            sink.drop_state(record)
            return
        path = sink.partial_path(record)
        t = Inbound(record, sink, path)
        if not path.exists():  # lost with the disk's cache, or cleaned up: start over
            t.have = ByteRanges()
            record.have = []
            partial_file.create(t)
        with self._lock:
            self._active[record.key] = t
        log.info("resumed transfer %s from %s: %d of %d bytes held", record.tid, record.peer,
                 t.have.total(), record.size)

    # -- segments (transfer lane) -------------------------------------------------------

    def on_segment(self, topic: str, payload: bytes, retained: bool) -> None:
        """Validate one segment at the edge; write it, or drop and count it."""
        addr = parse_segment_topic(self.xfer_base, topic)
        if addr is None:
            self._drops.drop("topic", topic)
            return
        if retained:
            self._drops.drop("retained", topic)
            return
        with self._lock:
            t = self._active.get((addr.sender, addr.tid))
            if t is None:
                self._drops.drop("unknown", topic)
                return
            record = t.record
            length = segment_length(addr.offset, record.size, record.segment_size)
            if length is None:
                self._drops.drop("offset", topic)
                return
            if len(payload) != length:
                self._drops.drop("length", topic)
                return
            if crc32(payload) != addr.crc32:
                self._drops.drop("crc", topic)
                return
            end = addr.offset + length
            t.touched = time.monotonic()
            if t.have.covers(addr.offset, end):
                t.stats.duplicates += 1
                self._schedule_ack(t)  # the sender evidently has not heard
                return
            if len(t.have) >= self.settings.max_gaps and t.have.would_split(addr.offset, end):
                self._drops.drop("gaps", topic)
                return
            try:
                partial_file.write_at(t, addr.offset, payload)
            except OSError as err:
                log.error("cannot write transfer %s to %s: %s", record.tid, t.path, err)
                return
            t.have.add(addr.offset, end)
            t.stats.received += 1
            t.unsynced += 1
            partial_file.hash_forward(t, addr.offset, payload)
            if record.direction == "download" and t.have.covers(0, record.size):
                with contextlib.suppress(TransferError):
                    self._finish(t)
                return
            if t.unsynced >= self.settings.ack_every:
                self._flush_quietly(t)
            else:
                self._schedule_ack(t)

    # -- acknowledgements ---------------------------------------------------------------

    def _schedule_ack(self, t: Inbound) -> None:
        if t.ack_due is None:
            t.ack_due = time.monotonic() + self.settings.ack_delay_s
            self._wake.notify()

    def _flush(self, t: Inbound) -> None:
        """Make what was written durable, persist the ranges, then acknowledge them."""
        t.ack_due = None
        if t.unsynced:
            partial_file.sync(t, self.settings.fsync)
            t.record.have = [list(pair) for pair in t.have]
            t.record.updated_at = time.time()
            t.sink.save_progress(t.record)
            t.unsynced = 0
        have, more = t.have.to_wire(self.settings.max_wire_ranges)
        t.stats.acks += 1
        self.bus.send(t.record.peer_inbox,
                      XferAck(tid=t.record.tid, have=have, more=more or None))

    def _flush_quietly(self, t: Inbound) -> None:
        """Flush; on failure send no ack (the sender will resend) and keep going."""
        try:
            self._flush(t)
        except OSError as err:  # a full or failing disk
            log.error("cannot make transfer %s durable: %s", t.record.tid, err)
        except Exception:  # the sink's storage (a database) failed
            log.exception("cannot record the progress of transfer %s", t.record.tid)

    def _run_timer(self) -> None:
        with self._wake:
            while not self._stopping:
                now = time.monotonic()
                next_due = now + SWEEP_S
                for t in list(self._active.values()):
                    if t.ack_due is not None:
                        if t.ack_due <= now:
                            self._flush_quietly(t)
                        else:
                            next_due = min(next_due, t.ack_due)
                if now >= self._next_sweep:
                    self._next_sweep = now + SWEEP_S
                    try:
                        self._sweep(now)
                    except Exception:  # never let the timer die
                        log.exception("sweeping transfers failed")
                self._wake.wait(max(0.001, min(next_due, self._next_sweep) - now))

    def _sweep(self, now: float) -> None:
        """Drop incoming transfers idle too long and finished ones kept long enough."""
        for t in list(self._active.values()):
            if now - t.touched > self.settings.idle_expiry_s:
                log.info("dropping transfer %s from %s: idle for %.0f s", t.record.tid,
                         t.record.peer, now - t.touched)
                self._fail(t, TransferAborted("the transfer idled out"), TransferPhase.ABORTED)
        self._finished.expire(time.time())

    # -- control messages (transfer lane) -------------------------------------------------

    def on_init(self, incoming: Incoming) -> None:
        body: XferInit = incoming.body
        sender = incoming.sender
        if sender is None:
            return
        try:
            state = self._init(incoming, sender, body)
        except TransferError as err:
            self.bus.reply_error(incoming, wire_code(err), str(err)[:4096])
            return
        self.bus.reply(incoming, state)

    def _init(self, incoming: Incoming, sender: str, body: XferInit) -> XferState:
        self.check_description(body)
        if body.direction != "upload":
            raise TransferRefused("invalid", "xfer.init offers an upload; downloads start "
                                  "with xfer.fetch")
        peer_inbox = sender_inbox(self.bus.topics, incoming, sender)
        key = (sender, body.tid)
        with self._lock:
            t = self._active.get(key)
            if t is not None:
                if not same_file(t.record, body):
                    raise TransferRefused("conflict", f"transfer {body.tid} already offers "
                                          "another file")
                self._flush_quietly(t)
                return self._state(t)
            done = self._finished.record(key)
            if done is not None:
                if not same_file(done, body):
                    raise TransferRefused("conflict", f"transfer {body.tid} is finished and "
                                          "was another file")
                return complete_state(done)
            if self.sink is None:
                raise TransferRefused("unsupported", f"{self.bus.principal or 'this side'} "
                                      "does not accept uploads")
            self._check_room(sender)
            offer = Offer(peer=sender, tid=body.tid, direction=body.direction, name=body.name,
                          size=body.size, sha256=body.sha256, segment_size=body.segment_size,
                          purpose=dict(body.purpose))
            record = TransferRecord(tid=body.tid, peer=sender, peer_inbox=peer_inbox,
                                    direction="upload", name=body.name, size=body.size,
                                    sha256=body.sha256, segment_size=body.segment_size,
                                    purpose=dict(body.purpose))
            admission = self.sink.admit(offer)
            if admission.ref is not None:  # held already: complete at once
                record.move(TransferPhase.COMPLETE)
                record.ref = admission.ref
                record.have = [[0, record.size]] if record.size else []
                self._save_done(record, self.sink)
                return complete_state(record)
            t = self._open_new(record, self.sink)
            return self._state(t)

    def check_description(self, body: XferInit) -> None:
        """What an offer (or a holder's description) must satisfy before anything is kept."""
        if not valid_sha256(body.sha256):
            raise TransferRefused("invalid", "sha256 must be 64 lowercase hex digits")
        if not self.settings.fits(body.segment_size, self.bus.config.max_payload):
            raise TransferRefused("invalid", f"segment_size {body.segment_size} does not fit "
                                  f"this side (bus.max_payload {self.bus.config.max_payload})")
        if body.size > self.settings.max_size:
            raise TransferRefused("too_large", f"{body.size} bytes is more than the "
                                  f"{self.settings.max_size} this side takes")

    def _check_room(self, peer: str) -> None:
        mine = sum(1 for key in self._active if key[0] == peer)
        if mine >= self.settings.max_active_per_peer:
            raise TransferRefused("busy", f"{peer} already has {mine} transfers open here; "
                                  "finish or abort one first")
        if len(self._active) >= self.settings.max_active:
            raise TransferRefused("busy", "too many transfers open here; try again later")

    def _open_new(self, record: TransferRecord, sink: Sink) -> Inbound:
        t = Inbound(record, sink, sink.partial_path(record))
        try:
            partial_file.create(t)
            sink.save_state(record)
        except OSError as err:
            partial_file.close(t)
            with contextlib.suppress(OSError):
                t.path.unlink()
            sink.drop_state(record)
            raise TransferError(f"cannot store the file here: {err.strerror or err}",
                                "internal") from err
        self._active[record.key] = t
        return t

    def on_status(self, incoming: Incoming) -> None:
        key = (incoming.sender or "", incoming.body.tid)
        with self._lock:
            t = self._active.get(key)
            if t is not None:
                self._flush_quietly(t)
                state = self._state(t)
            elif (done := self._finished.record(key)) is not None:
                state = complete_state(done)
            else:
                self.bus.reply_error(incoming, "not_found",
                                     f"no transfer {incoming.body.tid} from you here")
                return
        self.bus.reply(incoming, state)

    def on_fin(self, incoming: Incoming) -> None:
        body: XferFin = incoming.body
        key = (incoming.sender or "", body.tid)
        try:
            with self._lock:
                state = self._fin(key, body)
        except TransferError as err:
            self.bus.reply_error(incoming, wire_code(err), str(err)[:4096])
            return
        self.bus.reply(incoming, state)

    def _fin(self, key: Key, body: XferFin) -> XferState:
        done = self._finished.record(key)
        if done is not None:
            if (done.size, done.sha256) != (body.size, body.sha256):
                raise TransferRefused("conflict", "fin names another file than the "
                                      "finished transfer")
            return complete_state(done)
        t = self._active.get(key)
        if t is None:
            raise TransferRefused("not_found", f"no transfer {body.tid} from you here")
        if (t.record.size, t.record.sha256) != (body.size, body.sha256):
            raise TransferRefused("conflict", "fin names another size or hash than init")
        if not t.have.covers(0, t.record.size):
            self._flush_quietly(t)
            return self._state(t)
        self._finish(t)
        return complete_state(t.record)

    def on_abort(self, incoming: Incoming) -> bool:
        """Abort an incoming transfer; False when there is none (maybe an outgoing one)."""
        key = (incoming.sender or "", incoming.body.tid)
        with self._lock:
            t = self._active.get(key)
            if t is None:
                return False
            reason = incoming.body.reason or "aborted by the sender"
            self._fail(t, TransferAborted(f"{t.record.peer}: {reason}"), TransferPhase.ABORTED)
        self.bus.reply(incoming, Ok())
        return True

    # -- finishing ------------------------------------------------------------------

    def _finish(self, t: Inbound) -> None:
        """Verify size and hash; then the sink takes the file. Raises on failure, and a
        failed transfer leaves nothing behind."""
        record = t.record
        try:
            digest = partial_file.final_digest(t, self.settings.fsync)
        except OSError as err:
            raise TransferError(f"cannot read the received file back: {err}", "internal") \
                from err
        except TransferRefused as err:
            self._fail(t, err)
            raise
        if digest != record.sha256:
            mismatch = TransferRefused(
                "hash_mismatch", f"{record.name}: the bytes received hash to {digest[:12]}…, "
                f"not the announced {record.sha256[:12]}…; nothing was kept")
            self._fail(t, mismatch)
            raise mismatch
        partial_file.close(t)
        try:
            ref = t.sink.complete(record, t.path)
        except TransferRefused as err:
            self._fail(t, err)
            raise
        except Exception as err:  # a storage bug or a failing disk: keep it resumable
            log.exception("storage could not take transfer %s", record.tid)
            raise TransferError("the receiving side could not store the file; try again",
                                "internal") from err
        record.move(TransferPhase.COMPLETE)
        record.ref = ref
        record.have = [[0, record.size]] if record.size else []
        self._active.pop(record.key, None)
        self._finished.keep_stats(t.key, t.stats)
        if record.direction == "upload":
            try:
                self._save_done(record, t.sink)
            except OSError as err:
                log.warning("cannot persist finished transfer %s: %s", record.tid, err)
        else:  # the holder streams until it hears that everything arrived
            t.sink.drop_state(record)
            self.bus.send(record.peer_inbox, XferAck(tid=record.tid, have=record.have))
        log.info("transfer %s from %s complete: %s, %d bytes", record.tid, record.peer,
                 record.name, record.size)
        t.finished.set()

    def _fail(self, t: Inbound, err: TransferError,
              phase: TransferPhase = TransferPhase.FAILED) -> None:
        """End ``t`` for good: delete the partial file and the state."""
        partial_file.close(t)
        with contextlib.suppress(OSError):
            t.path.unlink()
        t.record.move(phase)
        self._active.pop(t.key, None)
        self._finished.keep_stats(t.key, t.stats)
        try:
            t.sink.drop_state(t.record)
        except Exception:
            log.exception("storage could not drop transfer %s", t.record.tid)
        log.info("transfer %s from %s ended (%s): %s", t.record.tid, t.record.peer,
                 phase.value, err)
        if t.record.direction == "download":  # stop the holder's stream
            with contextlib.suppress(Exception):
                self.bus.send(t.record.peer_inbox,
                              XferAbort(tid=t.record.tid, reason=str(err)[:256] or "aborted"))
        t.error = err
        t.finished.set()

    def _save_done(self, record: TransferRecord, sink: Sink) -> None:
        sink.save_state(record)
        with self._lock:
            self._finished.remember(record, sink, time.time() + self.settings.keep_done_s)

    # -- local downloads --------------------------------------------------------------

    def expect(self, record: TransferRecord, sink: Sink) -> Inbound | None:
        """Get ready to receive a download this side fetches; None when the sink holds
        the content already (``record.ref`` is then set)."""
        with self._lock:
            t = self._active.get(record.key)
            if t is not None:
                return t
            offer = Offer(peer=record.peer, tid=record.tid, direction=record.direction,
                          name=record.name, size=record.size, sha256=record.sha256,
                          segment_size=record.segment_size, purpose=dict(record.purpose))
            admission = sink.admit(offer)
            if admission.ref is not None:
                record.ref = admission.ref
                return None
            path = sink.partial_path(record)
            if record.have and path.exists():
                t = Inbound(record, sink, path)
                self._active[record.key] = t
                return t
            record.have = []
            return self._open_new(record, sink)

    def finish_if_complete(self, t: Inbound) -> None:
        """A download whose bytes are all here already (resumed): verify and hand over."""
        with self._lock:
            if t.key in self._active and t.have.covers(0, t.record.size):
                with contextlib.suppress(TransferError):
                    self._finish(t)

    def drop(self, t: Inbound, err: TransferError) -> None:
        """Give up a local download (the holder refused or vanished for good)."""
        with self._lock:
            if t.key in self._active:
                self._fail(t, err, TransferPhase.ABORTED)

    def missing(self, t: Inbound) -> ByteRanges:
        with self._lock:
            return t.have.missing(t.record.size)

    def stats(self, peer: str, tid: str) -> ReceiveStats | None:
        with self._lock:
            t = self._active.get((peer, tid))
            return t.stats if t is not None else self._finished.stats((peer, tid))

    def holding(self, peer: str, tid: str) -> ByteRanges | None:
        """The durable-or-written ranges of an active transfer (tests, progress)."""
        with self._lock:
            t = self._active.get((peer, tid))
            return t.have.copy() if t is not None else None

    def active(self) -> list[TransferRecord]:
        with self._lock:
            return [t.record for t in self._active.values()]

    # -- helpers ------------------------------------------------------------------------

    def _state(self, t: Inbound) -> XferState:
        have, more = t.have.to_wire(self.settings.max_wire_ranges)
        return XferState(tid=t.record.tid, state="receiving", size=t.record.size, have=have,
                         more=more or None)

    def on_progress(self, t: Inbound, callback: Callable[[int, int], None] | None) -> None:
        if callback is not None:
            with self._lock:
                done = t.have.total()
            callback(done, t.record.size)
