"""OutputStreamer: turns a command's raw output into sequence-numbered ``exec.output``.

The executor calls ``offer(stream, data, on_room)`` from its I/O loop (or ``feed`` / the
streamer itself, a plain ``OutputSink``, from a reader thread). One streamer thread per command
cuts the bytes into chunks (coalesced up to ``chunk_bytes`` or ``linger_s``, one stream per
chunk), numbers them from 0 across both streams, keeps the newest ones in a bounded ring
(for ``exec.logs``) and publishes them to every *target* (the client of an
``mode=output`` command, and anyone following with ``exec.logs follow``), then the final
``exec.exit``.

Flow control, end to end:

- publishing waits for the broker's PUBACK once more than ``window`` messages (or
  ``window_bytes``) are in flight, so paho's queue stays bounded and a broker that is
  slower than the command slows the streamer down, never the other way round;
- while the streamer thread waits, at most ``max_pending`` bytes (plus one read) are
  buffered: then ``offer`` answers "full" and the executor stops reading that pipe until
  ``on_room`` is called (``feed`` instead blocks its reader thread), so the command's
  writes block: backpressure reaches the command, memory stays bounded;
- bytes beyond ``max_bytes`` are dropped (and counted): ``truncated``.

Everything is sent from the streamer thread, never from a paho callback (waiting for a
PUBACK there would deadlock the network loop).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from paho.mqtt.client import MQTTMessageInfo
from paho.mqtt.enums import MQTTErrorCode

from schemas.codec import new_id
from schemas.messages import Body, ExecExit, ExecOutput
from schemas.registry import validator

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
LINGER_S = 0.02
WINDOW = 64
WINDOW_BYTES = 32 * 1024 * 1024
MAX_CHUNK_BYTES = 1_499_997  # base64 of it fits exec.output's 2,000,000-char data limit

Send = Callable[[str, Body], Any]
"""Publishes a body into a base inbox (``Bus.send``); returns paho's MQTTMessageInfo."""

SendBytes = Callable[[str, bytes], Any]
"""Publishes an encoded message into a base inbox under our sender id."""


def encode_output(exec_id: str, seq: int, stream: str, data: bytes) -> bytes:
    """``exec.output`` as wire bytes, with the data spliced in rather than JSON-dumped.

    Why: for big chunks ``json.dumps`` (escaping scan of the base64 text, then a copy to
    bytes) costs as much as the base64 itself. Base64 never needs JSON escaping, so the
    small head is validated against the schema and dumped, and the data goes in as is;
    the result is the same JSON ``codec.encode`` would produce.
    """
    if len(data) > MAX_CHUNK_BYTES:
        raise ValueError(f"chunk of {len(data)} bytes exceeds exec.output's data limit")
    head = {"type": ExecOutput.TYPE, "v": ExecOutput.V, "id": new_id(), "ts": time.time(),
            "exec_id": exec_id, "seq": seq, "stream": stream, "data": ""}
    validator(ExecOutput.TYPE)(head)
    text = json.dumps(head, separators=(",", ":"), allow_nan=False)
    return b"".join((text[:-2].encode(), base64.b64encode(data), b'"}'))


def wait_published(info: Any, timeout: float) -> bool:
    """True once the broker acknowledged ``info``'s message; False on timeout.

    paho's own ``wait_for_publish`` raises at once for a message published while the
    connection was down, although paho keeps it and resends it after the reconnect: here
    such a message is waited for like any other.
    """
    if not isinstance(info, MQTTMessageInfo):
        return True  # a test double, or QoS 0
    if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
        raise RuntimeError("paho's outgoing queue is full")
    deadline = time.monotonic() + timeout
    condition = info._condition  # private: see the docstring
    with condition:
        while not info._published:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            condition.wait(min(left, 0.5))
    return True


@dataclass(frozen=True)
class Chunk:
    seq: int
    stream: str
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "stream": self.stream,
                "data": base64.b64encode(self.data).decode("ascii")}


@dataclass
class _Target:
    inbox: str
    backlog: deque[Chunk] = field(default_factory=deque)


@dataclass(frozen=True)
class LogsView:
    """What ``exec.logs`` answers: kept chunks from a seq on, and the exit if known."""

    chunks: list[Chunk]
    first_seq: int
    exit: ExecExit | None
    following: bool


class OutputStreamer:
    """The output side of one command (see the module docstring)."""

    def __init__(
        self,
        exec_id: str,
        send: Send,
        *,
        send_bytes: SendBytes | None = None,
        max_bytes: int,
        ring_bytes: int,
        chunk_bytes: int = CHUNK_BYTES,
        linger_s: float = LINGER_S,
        max_pending: int | None = None,
        window: int = WINDOW,
        window_bytes: int = WINDOW_BYTES,
    ) -> None:
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES or window < 1:
            raise ValueError(f"chunk_bytes must be 1..{MAX_CHUNK_BYTES}, window >= 1")
        self.exec_id = exec_id
        self._send = send
        self._send_bytes = send_bytes
        self.max_bytes = max(0, max_bytes)
        self.ring_bytes = max(0, ring_bytes)
        self.chunk_bytes = chunk_bytes
        self.linger_s = linger_s
        self.max_pending = max_pending if max_pending is not None else 4 * chunk_bytes
        self.window = window
        self.window_bytes = window_bytes
        self._cond = threading.Condition()
        self._segments: list[tuple[str, bytearray]] = []
        self._pending = 0
        self._pending_since = 0.0
        self._eof = False
        self._aborted = False
        self._exit_asked: ExecExit | None = None  # from finish(), counters not final yet
        self._exit: ExecExit | None = None  # stamped with the final counters, being sent
        self._next_seq = 0
        self._accepted = 0
        self._dropped = 0
        self._ring: deque[Chunk] = deque()
        self._ring_size = 0
        self._targets: list[_Target] = []
        self._inflight: deque[tuple[Any, int]] = deque()
        self._inflight_bytes = 0
        self._thread: threading.Thread | None = None
        self._cut_done = threading.Event()
        self._on_room: list[Callable[[], None]] = []  # readers paused until room frees
        self._on_finished: Callable[[], None] | None = None
        self.finished = threading.Event()

    # -- statistics ----------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """Seq of the last chunk cut so far (-1: none)."""
        return self._next_seq - 1

    @property
    def output_bytes(self) -> int:
        """Bytes accepted (numbered and sent/kept); dropped bytes are not counted."""
        return self._accepted

    @property
    def dropped_bytes(self) -> int:
        return self._dropped

    @property
    def pending_bytes(self) -> int:
        """Bytes accepted but not cut into chunks yet (bounded by ``max_pending``)."""
        return self._pending

    @property
    def truncated(self) -> bool:
        return self._dropped > 0

    # -- producer side (executor reader threads) -------------------------------------

    def feed(self, stream: str, data: bytes) -> None:
        """Accept output; blocks while ``max_pending`` bytes wait (backpressure)."""
        if not data:
            return
        with self._cond:
            self._accept_locked(stream, data)
            while self._pending > self.max_pending and not (self._aborted or self._eof):
                self._cond.wait(1.0)

    __call__ = feed  # an OutputSink for drivers that read on threads of their own

    def offer(self, stream: str, data: bytes, on_room: Callable[[], None]) -> bool:
        """Accept output without blocking (``PacedSink``): False when ``max_pending`` bytes
        now wait; ``on_room()`` is then called once, from another thread, when they no
        longer do (or the streamer ends)."""
        with self._cond:
            if data:
                self._accept_locked(stream, data)
            if self._pending <= self.max_pending or self._aborted:
                return True
            self._on_room.append(on_room)
            return False

    def _accept_locked(self, stream: str, data: bytes) -> None:
        if self._aborted or self._eof:
            return
        room = self.max_bytes - self._accepted
        if len(data) > room:
            self._dropped += len(data) - max(room, 0)
            data = data[: max(room, 0)]
            if not data:
                return
        self._accepted += len(data)
        if self._segments and self._segments[-1][0] == stream:
            self._segments[-1][1].extend(data)
        else:
            self._segments.append((stream, bytearray(data)))
        if self._pending == 0:
            self._pending_since = time.monotonic()
        self._pending += len(data)
        self._cond.notify_all()

    def _room_locked(self) -> list[Callable[[], None]]:
        """The paused readers to resume, when there is room (or never will be a bound)."""
        if not self._on_room or (self._pending > self.max_pending and not self._aborted):
            return []
        waiting, self._on_room = self._on_room, []
        return waiting

    @staticmethod
    def _call_all(callbacks: list[Callable[[], None]]) -> None:
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("output callback %r failed", callback)

    def close_input(self) -> None:
        """No more output will come (the command exited and its pipes drained)."""
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_cut(self, timeout: float | None = None) -> bool:
        """Wait until every accepted byte has a seq (after ``close_input``)."""
        return self._cut_done.wait(timeout)

    # -- targets -------------------------------------------------------------------------

    def add_target(self, inbox: str) -> None:
        """Stream everything (what the ring still holds, then new output) to ``inbox``.

        For ``mode=output``, called before any output exists, that is everything from
        seq 0.
        """
        with self._cond:
            self._targets.append(_Target(inbox, deque(self._ring)))
            self._cond.notify_all()

    def logs(self, from_seq: int, budget: int, follow_inbox: str | None,
             reply: Callable[[LogsView], None]) -> None:
        """Answer ``exec.logs``: call ``reply`` with the kept chunks from ``from_seq``.

        ``reply`` runs under the streamer's lock, so a follower's reply is published
        before any chunk streamed to it. Chunks beyond ``budget`` raw bytes are left out of
        the reply; a follower gets them streamed, others ask again from ``first_seq +
        len(chunks)``.
        """
        with self._cond:
            kept = [c for c in self._ring if c.seq >= from_seq]
            chunks: list[Chunk] = []
            size = 0
            for chunk in kept:
                if chunks and size + len(chunk.data) > budget:
                    break
                chunks.append(chunk)
                size += len(chunk.data)
            first_seq = chunks[0].seq if chunks else max(from_seq, self._next_seq)
            following = follow_inbox is not None and self._exit is None and not self._aborted
            reply(LogsView(chunks, first_seq, self._exit, following))
            if following:
                assert follow_inbox is not None
                self._targets.append(_Target(follow_inbox, deque(kept[len(chunks):])))
                self._cond.notify_all()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, run: Callable[[Callable[[], None]], None] | None = None) -> None:
        """Start publishing: on ``run`` (a pool of reused threads, e.g. ``ThreadReuse.run``:
        no thread started per command), else on a thread of its own."""
        if run is not None:
            run(self._run)
            return
        self._thread = threading.Thread(target=self._run, name=f"exec-{self.exec_id}-out",
                                        daemon=True)
        self._thread.start()

    def finish(self, exit_body: ExecExit,
               on_finished: Callable[[], None] | None = None) -> None:
        """Send ``exit_body`` to every target after their last chunk; the thread then ends.

        Its ``last_seq``, ``truncated`` and ``output_bytes`` are filled in by the streamer
        once every accepted byte is numbered (``exit`` then holds the final body).
        ``on_finished()`` is called on the streamer thread as it ends (at once, here, if
        it has already ended): after the exit's PUBACKs, so it may send what follows.
        """
        with self._cond:
            self._exit_asked = exit_body
            self._cond.notify_all()
            if not self.finished.is_set():
                self._on_finished = on_finished
                return
        if on_finished is not None:
            self._call_all([on_finished])

    def join(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    def abort(self) -> None:
        """Stop at once: drop what is pending, unblock producers, end the thread."""
        with self._cond:
            self._aborted = True
            self._segments.clear()
            self._pending = 0
            self._cond.notify_all()
            resume = self._room_locked()
        self._cut_done.set()
        self._call_all(resume)

    @property
    def exit(self) -> ExecExit | None:
        """The final exit body, once all output is numbered (None before)."""
        return self._exit

    # -- the streamer thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    work = self._next_work_locked()
                if work is None:
                    return
                batch, final = work
                for inbox, body in batch:
                    self._publish(inbox, body)
                if final:
                    self._drain_inflight()
                    return
        except Exception:
            log.exception("output streamer of %s failed", self.exec_id)
        finally:
            self._cut_done.set()
            with self._cond:
                self._aborted = True  # nothing more is taken: paused readers drain to EOF
                self.finished.set()
                then, self._on_finished = self._on_finished, None
                resume = self._room_locked()
            self._call_all(resume + ([then] if then is not None else []))

    def _next_work_locked(self) -> tuple[list[tuple[str, Chunk | ExecExit]], bool] | None:
        """Block until there is something to publish; None when aborted."""
        while True:
            if self._aborted:
                return None
            now = time.monotonic()
            if self._pending:
                full = self._pending >= self.chunk_bytes
                ripe = self._eof or now - self._pending_since >= self.linger_s
                if full or ripe:
                    self._cut_locked(force=ripe)
                    self._cond.notify_all()  # producers waiting for room
                    # (call_soon on the executor's loop: quick, and never waits for us)
                    self._call_all(self._room_locked())
            if self._eof and not self._pending:
                self._cut_done.set()
            batch: list[tuple[str, Chunk | ExecExit]] = []
            for target in self._targets:
                batch.extend((target.inbox, chunk) for chunk in target.backlog)
                target.backlog.clear()
            if batch:
                return batch, False
            if self._exit_asked is not None and self._cut_done.is_set():
                self._exit = dataclasses.replace(
                    self._exit_asked, last_seq=self.last_seq, truncated=self.truncated,
                    output_bytes=self._accepted)
                return [(t.inbox, self._exit) for t in self._targets], True
            timeout = None
            if self._pending:
                timeout = max(0.0, self._pending_since + self.linger_s - now)
            self._cond.wait(timeout)

    def _cut_locked(self, force: bool) -> None:
        """Turn pending bytes into numbered chunks; keep a partial tail unless ``force``."""
        size = self.chunk_bytes
        while self._segments:
            stream, buf = self._segments[0]
            last = len(self._segments) == 1
            while len(buf) >= size or (buf and (force or not last)):
                piece = bytes(buf[:size])
                del buf[:size]
                self._emit_locked(stream, piece)
            if buf:
                break
            self._segments.pop(0)
        self._pending = sum(len(b) for _, b in self._segments)
        if self._pending:
            self._pending_since = time.monotonic()

    def _emit_locked(self, stream: str, data: bytes) -> None:
        chunk = Chunk(self._next_seq, stream, data)
        self._next_seq += 1
        self._ring.append(chunk)
        self._ring_size += len(data)
        while self._ring_size > self.ring_bytes and len(self._ring) > 1:
            self._ring_size -= len(self._ring.popleft().data)
        if self.ring_bytes == 0 and self._ring:
            self._ring_size -= len(self._ring.popleft().data)
        for target in self._targets:
            target.backlog.append(chunk)

    def _publish(self, inbox: str, item: Chunk | ExecExit) -> None:
        size = len(item.data) if isinstance(item, Chunk) else 256
        while self._inflight and (len(self._inflight) >= self.window
                                  or self._inflight_bytes + size > self.window_bytes):
            if not self._wait_oldest():
                return
        try:
            if isinstance(item, ExecExit):
                info = self._send(inbox, item)
            elif self._send_bytes is not None:
                payload = encode_output(self.exec_id, item.seq, item.stream, item.data)
                info = self._send_bytes(inbox, payload)
            else:
                info = self._send(inbox, ExecOutput(
                    exec_id=self.exec_id, seq=item.seq, stream=item.stream,
                    data=base64.b64encode(item.data).decode("ascii")))
        except Exception:
            log.exception("cannot publish output of %s to %s", self.exec_id, inbox)
            return
        self._inflight.append((info, size))
        self._inflight_bytes += size

    def _wait_oldest(self) -> bool:
        """Wait for the oldest in-flight message's PUBACK; False when aborted meanwhile."""
        info, size = self._inflight[0]
        while True:
            try:
                done = wait_published(info, 1.0)
            except RuntimeError as err:
                log.warning("output of %s: %s; message dropped", self.exec_id, err)
                done = True
            if done:
                self._inflight.popleft()
                self._inflight_bytes -= size
                return True
            if self._aborted:
                return False

    def _drain_inflight(self) -> None:
        while self._inflight:
            if not self._wait_oldest():
                return
