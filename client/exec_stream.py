"""Reassembly of one remote command's output stream.

The worker numbers every ``exec.output`` chunk (``seq`` from 0, contiguous across stdout
and stderr) and ends with ``exec.exit {last_seq}``. MQTT QoS 1 may deliver a chunk twice,
and a reconnect or a ``exec.logs`` resync may deliver chunks late or out of order, so the
client cannot simply print what arrives: :class:`ExecStream` buffers out-of-order chunks,
drops duplicates, hands chunks on strictly in ``seq`` order, and completes only when it
has the exit *and* every ``seq <= last_seq``.

Pure logic (no bus): producers call :meth:`ExecStream.feed` / :meth:`ExecStream.feed_exit`
from any thread; one consumer iterates or waits. Recovery of lost chunks is the owner's
job, through the ``on_stall`` callback (see ``client.reservation``).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import IO, Any

from client.errors import ClientError
from schemas.errors import XcloudError
from schemas.exec_messages import STDIN_CHUNK_BYTES, STDIN_WINDOW
from schemas.outcome import Outcome

log = logging.getLogger(__name__)

# After exec.exit, how long missing chunks may take to arrive before ``on_stall`` fires.
GAP_GRACE_S = 1.0


@dataclass(frozen=True)
class OutputChunk:
    """A piece of a command's output, in order: ``stream`` is "stdout" or "stderr"."""

    stream: str
    data: bytes
    seq: int = -1


@dataclass(frozen=True)
class ExecResult(Outcome):
    """How a remote command ended, with its output when it was kept.

    The exit facts are ``Outcome``'s (keyword-only); here they are always filled in, so
    ``duration_s``, the flags and ``output_bytes`` are never None.
    """

    exec_id: str
    stdout: bytes = b""
    stderr: bytes = b""
    duration_s: float = field(default=0.0, kw_only=True)
    timed_out: bool = field(default=False, kw_only=True)
    truncated: bool = field(default=False, kw_only=True)
    oom_killed: bool = field(default=False, kw_only=True)
    output_bytes: int = field(default=0, kw_only=True)
    # chunks the worker no longer had when we asked again
    lost_chunks: int = field(default=0, kw_only=True)

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        """Exit code 0, even with an ``error`` note (the worker may add one, e.g. why it
        stopped a command that then exited cleanly)."""
        return self.exit_code == 0


def decode_data(data: str) -> bytes:
    """The raw bytes of an ``exec.output`` ``data`` field."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ClientError(f"malformed output chunk: {err}") from err


class ExecStream:
    """In-order, deduplicated output of one exec, completed by its exit.

    ``start_seq`` is the first seq expected (0 for a fresh command); ``None`` means "not
    known yet" (``exec.logs`` tells where the kept output starts) and chunks are buffered
    until :meth:`set_base`. ``buffer_chunks`` keeps chunks for an iterating consumer;
    ``keep_output`` accumulates stdout/stderr for :attr:`result`.
    """

    def __init__(
        self,
        exec_id: str,
        *,
        start_seq: int | None = 0,
        buffer_chunks: bool = True,
        keep_output: bool = True,
        stall_s: float = 10.0,
        on_stall: Callable[[ExecStream], None] | None = None,
        on_close: Callable[[ExecStream], None] | None = None,
    ) -> None:
        self.exec_id = exec_id
        self.buffer_chunks = buffer_chunks
        self.keep_output = keep_output
        self.stall_s = stall_s
        self.on_stall = on_stall
        self.on_close = on_close
        self._cond = threading.Condition()
        self._next_seq: int | None = start_seq
        self._pending: dict[int, OutputChunk] = {}
        self._ready: deque[OutputChunk] = deque()
        self._ready_bytes = 0
        self._stdout: list[bytes] = []
        self._stderr: list[bytes] = []
        self._exit: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._lost = 0
        self.duplicates = 0
        self.received_bytes = 0
        self.last_progress = time.monotonic()
        self._exit_at: float | None = None
        self._last_stall_call = 0.0
        #: The command's stdin when it was started with one (``ReservedWorker.stream``).
        self.stdin: StdinSender | None = None

    # -- producer side (any thread) ---------------------------------------------------

    def feed(self, seq: int, stream: str, data: bytes) -> bool:
        """Add one chunk; False when it was a duplicate (or arrived after the end)."""
        with self._cond:
            if self._closed or self._error is not None:
                return False
            if (self._next_seq is not None and seq < self._next_seq) or seq in self._pending:
                self.duplicates += 1
                return False
            if self._exit is not None and seq > self._exit["last_seq"]:
                log.warning("exec %s: chunk %d after last_seq %d dropped", self.exec_id,
                            seq, self._exit["last_seq"])
                return False
            self._pending[seq] = OutputChunk(stream, data, seq)
            self.last_progress = time.monotonic()
            self._advance()
            return True

    def feed_exit(self, exit_info: dict[str, Any]) -> None:
        """Record the command's end (fields of ``exec.exit``); the first one wins."""
        with self._cond:
            if self._exit is not None or self._closed:
                return
            info = dict(exit_info)
            info["last_seq"] = int(info.get("last_seq", -1))
            self._exit = info
            self._exit_at = self.last_progress = time.monotonic()
            for seq in [s for s in self._pending if s > info["last_seq"]]:
                del self._pending[seq]
            self._cond.notify_all()

    def set_base(self, seq: int) -> None:
        """Where the output starts when the stream was created with ``start_seq=None``."""
        with self._cond:
            if self._next_seq is None:
                self._next_seq = seq
                for old in [s for s in self._pending if s < seq]:
                    del self._pending[old]
                self._advance()

    def skip_to(self, seq: int) -> None:
        """Give up on chunks before ``seq`` (the worker no longer keeps them)."""
        with self._cond:
            if self._next_seq is None or seq <= self._next_seq:
                return
            lost = sum(1 for s in range(self._next_seq, seq) if s not in self._pending)
            self._lost += lost
            log.warning("exec %s: %d output chunk(s) lost before seq %d", self.exec_id,
                        lost, seq)
            for s in range(self._next_seq, seq):
                chunk = self._pending.pop(s, None)
                if chunk is not None:
                    self._accept(chunk)
            self._next_seq = seq
            self._advance()

    def fail(self, error: BaseException) -> None:
        """End the stream with an error (reservation ended, exec refused, ...)."""
        with self._cond:
            if self._error is None and not self.complete:
                self._error = error
            self._cond.notify_all()

    def _advance(self) -> None:
        if self._next_seq is None:
            return
        moved = False
        while self._next_seq in self._pending:
            self._accept(self._pending.pop(self._next_seq))
            self._next_seq += 1
            moved = True
        if moved or self.complete:
            self._cond.notify_all()

    def _accept(self, chunk: OutputChunk) -> None:
        self.received_bytes += len(chunk.data)
        if self.keep_output:
            (self._stderr if chunk.stream == "stderr" else self._stdout).append(chunk.data)
        if self.buffer_chunks:
            self._ready.append(chunk)
            self._ready_bytes += len(chunk.data)

    # -- state ----------------------------------------------------------------------------

    @property
    def next_seq(self) -> int | None:
        """The first seq not yet received in order (where a resync should start)."""
        return self._next_seq

    @property
    def ready_bytes(self) -> int:
        """Bytes received in order and not yet taken by the consumer (its backlog)."""
        return self._ready_bytes

    def discard_ready(self) -> int:
        """Drop the chunks received but not yet taken (after Ctrl-C: the user wants the
        prompt back, not the backlog); the number of bytes dropped."""
        with self._cond:
            dropped = self._ready_bytes
            self._ready.clear()
            self._ready_bytes = 0
        return dropped

    @property
    def exited(self) -> bool:
        return self._exit is not None

    @property
    def exited_for(self) -> float | None:
        """Seconds since the exit arrived (None before)."""
        return None if self._exit_at is None else time.monotonic() - self._exit_at

    def give_up(self) -> None:
        """Complete with whatever arrived: chunks still missing after the exit are lost."""
        with self._cond:
            if self._exit is not None and not self.complete:
                if self._next_seq is None:
                    self._next_seq = min([*self._pending, self._exit["last_seq"] + 1])
                self.skip_to(self._exit["last_seq"] + 1)
                self._cond.notify_all()

    @property
    def complete(self) -> bool:
        """Exit received and every chunk up to ``last_seq`` is in."""
        return (self._exit is not None and self._next_seq is not None
                and self._next_seq > self._exit["last_seq"])

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def missing(self) -> list[int]:
        """Seqs known to be missing (below the highest buffered one or ``last_seq``)."""
        with self._cond:
            if self._next_seq is None:
                return []
            top = max([*self._pending, self._exit["last_seq"] if self._exit else -1])
            return [s for s in range(self._next_seq, top + 1) if s not in self._pending]

    @property
    def result(self) -> ExecResult:
        """The outcome; raises when the stream is not complete yet or failed."""
        with self._cond:
            if self._error is not None:
                raise self._error
            if not self.complete or self._exit is None:
                raise ClientError(f"exec {self.exec_id} has not finished")
            e = self._exit
            return ExecResult(
                exec_id=self.exec_id,
                stdout=b"".join(self._stdout),
                stderr=b"".join(self._stderr),
                exit_code=e.get("exit_code"),
                signal=e.get("signal"),
                duration_s=float(e.get("duration_s") or 0.0),
                timed_out=bool(e.get("timed_out")),
                truncated=bool(e.get("truncated")),
                oom_killed=bool(e.get("oom_killed")),
                error=e.get("error"),
                output_bytes=int(e.get("output_bytes") or self.received_bytes),
                lost_chunks=self._lost,
            )

    # -- consumer side --------------------------------------------------------------------

    def _stalled(self, now: float) -> bool:
        if self.on_stall is None or self.complete or self._error is not None or self._closed:
            return False
        if self._exit_at is not None:  # only chunks are missing: ask again soon
            since = max(self._exit_at, self.last_progress, self._last_stall_call)
            return now - since >= GAP_GRACE_S
        since = max(self.last_progress, self._last_stall_call)
        return now - since >= self.stall_s

    def _check_stall(self) -> None:
        """Call ``on_stall`` (outside the lock) when nothing moved for too long."""
        now = time.monotonic()
        with self._cond:
            stalled = self._stalled(now)
            if stalled:
                self._last_stall_call = now
        if stalled and self.on_stall is not None:
            try:
                self.on_stall(self)
            except ClientError as err:
                self.fail(err)
            except Exception:
                log.exception("exec %s: resync failed", self.exec_id)

    def next_chunk(self, timeout: float | None = None) -> OutputChunk | None:
        """The next chunk in order; None when ``timeout`` passed first.

        Raises StopIteration at the end and the stream's error when it failed; either
        way the stream is closed (its owner stops routing output to it).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                if self._ready:
                    chunk = self._ready.popleft()
                    self._ready_bytes -= len(chunk.data)
                    return chunk
                error = self._error
                finished = error is not None or self.complete or self._closed
                if not finished:
                    wait = 0.25 if self.on_stall else None
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return None
                        wait = left if wait is None else min(wait, left)
                    self._cond.wait(wait)
            if finished:
                self.close()
                if error is not None:
                    raise error
                raise StopIteration
            self._check_stall()

    def __iter__(self) -> Iterator[OutputChunk]:
        return self

    def __next__(self) -> OutputChunk:
        if not self.buffer_chunks:
            raise TypeError("this stream keeps no chunks to iterate; use wait()")
        chunk = self.next_chunk()
        assert chunk is not None
        return chunk

    def wait(self, timeout: float | None = None) -> ExecResult:
        """Block until the stream completes (or fails); the result. Closes the stream."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                error = self._error
                complete = self.complete
                if error is None and not complete:
                    if self._closed:
                        raise ClientError(f"exec {self.exec_id}: stream closed")
                    wait = 0.25 if self.on_stall else None
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise ClientError(f"exec {self.exec_id} did not finish in "
                                              f"{timeout:g}s")
                        wait = left if wait is None else min(wait, left)
                    self._cond.wait(wait)
            if error is not None or complete:
                self.close()
                if error is not None:
                    raise error
                return self.result
            self._check_stall()

    def close(self) -> None:
        """Stop following (idempotent); the owner's ``on_close`` unregisters the stream."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self.on_close is not None:
            self.on_close(self)

    def __enter__(self) -> ExecStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Raw bytes per ``exec.stdin`` piece, and pieces unacknowledged at most (the schema's).
STDIN_PIECE_BYTES = STDIN_CHUNK_BYTES  # the schema's bound on one piece


class StdinSender:
    """A remote command's stdin: ``write(data)`` and ``close()``, like a pipe's.

    Input goes out in numbered pieces of at most ``STDIN_PIECE_BYTES``; at most ``window``
    of them wait for the worker's acknowledgement, which comes once a piece is written
    to the command, so ``write`` blocks while the command does not read (a pipe's
    back-pressure) and neither the broker nor the worker ever holds more than the window.
    When the command stops taking input (it exited, closed its stdin: ``head -c 10``),
    ``closed`` becomes True and later writes are dropped quietly, as ``ssh`` does.

    Pure logic: ``send(seq, data, eof)`` puts a piece on the wire and returns a future of
    its reply; ``read_ack(reply)`` makes ``(acked, closed)`` of it (raising ClientError
    for a refusal); ``check()`` raises when waiting makes no sense any more (the
    reservation ended). A piece unanswered for ``resend_s`` is sent again (same seq: the
    worker takes it once).
    """

    def __init__(self, exec_id: str, send: Callable[[int, bytes, bool], Future[Any]],
                 read_ack: Callable[[Any], tuple[int, bool]], *,
                 check: Callable[[], None] = lambda: None, resend_s: float = 10.0,
                 window: int = STDIN_WINDOW, piece_bytes: int = STDIN_PIECE_BYTES) -> None:
        self.exec_id = exec_id
        self._send = send
        self._read_ack = read_ack
        self._check = check
        self.resend_s = resend_s
        self.window = window
        self.piece_bytes = piece_bytes
        self._lock = threading.Lock()  # one writer at a time
        self._seq = 0
        self._acked = -1
        self._remote_closed = False
        self._eof_sent = False
        # (seq, data, eof, futures, last sent) of pieces not yet acknowledged
        self._outstanding: deque[tuple[int, bytes, bool, list[Future[Any]], float]] = deque()
        self.bytes_sent = 0

    @property
    def closed(self) -> bool:
        """No more input goes out: ``close()`` was called or the command takes none."""
        return self._remote_closed or self._eof_sent

    def write(self, data: bytes | str) -> int:
        """Send ``data`` (str as UTF-8); blocks while the window is full. The count taken
        (all of it, also when it is dropped because the command takes no more input)."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        with self._lock:
            if self._eof_sent:
                raise ValueError("write to a closed stdin")
            for start in range(0, len(raw), self.piece_bytes):
                if self._remote_closed:
                    break
                self._put(raw[start:start + self.piece_bytes], eof=False)
        return len(raw)

    def close(self, timeout: float | None = None) -> None:
        """End of input (the command reads EOF); waits until the worker has it all."""
        with self._lock:
            if not self._eof_sent:
                if not self._remote_closed:
                    self._put(b"", eof=True)
                self._eof_sent = True
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._outstanding and not self._remote_closed:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self._settle_oldest()

    def __enter__(self) -> StdinSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _put(self, piece: bytes, *, eof: bool) -> None:
        while len(self._outstanding) >= self.window and not self._remote_closed:
            self._settle_oldest()
        if self._remote_closed:
            return
        seq = self._seq
        self._seq += 1
        fut = self._send(seq, piece, eof)
        self._outstanding.append((seq, piece, eof, [fut], time.monotonic()))
        self.bytes_sent += len(piece)

    def _settle_oldest(self) -> None:
        """Wait (a slice) for the oldest piece's answer; resend it when overdue."""
        seq, piece, eof, futures, sent = self._outstanding[0]
        done = [f for f in futures if f.done()]
        if not done:
            self._check()
            left = sent + self.resend_s - time.monotonic()
            try:
                if not futures:  # answered "not yet written" only: resend when overdue
                    time.sleep(min(0.5, max(0.0, left)))
                    raise FutureTimeout
                futures[0].result(min(0.5, max(0.0, left)))
                done = [futures[0]]
            except FutureTimeout:
                if time.monotonic() - sent >= self.resend_s:
                    log.info("exec %s: stdin piece %d unanswered; sending it again",
                             self.exec_id, seq)
                    futures.append(self._send(seq, piece, eof))
                    self._outstanding[0] = (seq, piece, eof, futures, time.monotonic())
                return
        for fut in done:
            futures.remove(fut)
            acked, closed = self._read_ack(fut.result())
            self._acked = max(self._acked, acked)
            self._remote_closed = self._remote_closed or closed
        while self._outstanding and (self._outstanding[0][0] <= self._acked
                                     or self._remote_closed):
            for fut in self._outstanding.popleft()[3]:
                fut.cancel()


def feed_in_background(sender: StdinSender, source: int | IO[bytes], name: str, *,
                       read_bytes: int = 256 * 1024,
                       on_end: Callable[[], None] | None = None) -> threading.Thread:
    """Copy ``source`` (a file descriptor or a binary file) into ``sender`` on a daemon
    thread until its end, then close the input; it stops early, quietly, when the
    command takes no more. A daemon: a source nobody closes must not keep us alive."""

    def read() -> bytes:
        if isinstance(source, int):
            return os.read(source, read_bytes)
        return source.read(read_bytes)

    def feed() -> None:
        try:
            while not sender.closed:
                data = read()
                if not data:
                    break
                sender.write(data)
            sender.close()
        except (OSError, XcloudError, CancelledError) as err:
            # The command's exit tells the user. XcloudError, not only ClientError: once
            # the command has ended the caller closes the bus, and the piece still awaiting
            # its answer then fails with the bus's own error (a traceback on the user's
            # terminal as the process exits, before this).
            log.info("input of %s stopped: %s", sender.exec_id, err)
        finally:
            if on_end is not None:
                on_end()

    thread = threading.Thread(target=feed, name=name, daemon=True)
    thread.start()
    return thread
