"""The grant holder's requests about its commands: ``exec.signal``, ``exec.list``,
``exec.logs`` and ``exec.stdin`` (each under a grant, see worker/exec_auth.py).

``exec.stdin`` feeds a command started with ``stdin: true`` through a :class:`StdinFeed`:
pieces are taken in ``seq`` order (a seq already taken is ignored, one that arrives early
waits for the gap), at most ``STDIN_WINDOW`` of them held, and written to the command by a
writer thread of their own, so neither the MQTT thread nor the lane ever waits on a
pipe. Each piece is answered (``exec.stdin.ack``) once written: that reply is the
client's credit, so the worker holds at most a window of input ahead of what the
command reads.
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import signal as _signal
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from broker.bus import Bus, Incoming
from schemas.exec_messages import (
    STDIN_CHUNK_BYTES,
    STDIN_WINDOW,
    ExecResize,
    ExecStdin,
    ExecStdinAck,
)
from schemas.messages import (
    ExecList,
    ExecListReply,
    ExecLogs,
    ExecLogsReply,
    ExecSignal,
    Ok,
)
from schemas.topics import Topics
from worker.exec_auth import ExecAuthorizer
from worker.executors.base import Executor, ExecutorError, TaskInput
from worker.output import LogsView

log = logging.getLogger(__name__)

#: How long one write waits for room in the pipe before the writer checks for a stop.
WRITE_POLL_S = 0.5

SIGNALS = frozenset({"INT", "TERM", "KILL", "HUP", "QUIT", "USR1", "USR2"})


class ExecRequests:
    """Answers signal, list and logs requests about the commands of a session."""

    def __init__(self, bus: Bus, topics: Topics, executor: Executor,
                 authorizer: ExecAuthorizer) -> None:
        self.bus = bus
        self.topics = topics
        self.executor = executor
        self.authorizer = authorizer

    def on_signal(self, incoming: Incoming) -> None:
        body: ExecSignal = incoming.body
        ex = self.authorizer.authorized_exec(incoming, body.grant, body.exec_id)
        if ex is None:
            return
        if body.signal not in SIGNALS:
            self.bus.reply_error(incoming, "invalid", f"unknown signal {body.signal}")
            return
        if ex.exit is not None:  # a Ctrl-C racing the exit is not an error
            self.bus.reply(incoming, Ok(detail={"exec_id": ex.exec_id, "state": "exited"}))
            return
        try:
            self.executor.signal(ex.handle, int(_signal.Signals[f"SIG{body.signal}"]))
        except ExecutorError as err:
            self.bus.reply_error(incoming, "internal", f"cannot signal {ex.exec_id}: {err}")
            return
        self.bus.reply(incoming, Ok(detail={"exec_id": ex.exec_id, "state": "running"}))

    def on_list(self, incoming: Incoming) -> None:
        body: ExecList = incoming.body
        auth = self.authorizer.authorize(incoming, body.grant)
        if auth is None:
            return
        session = auth[1]
        with session.lock:
            execs = [e.summary() for e in session.execs.values()]
        self.bus.reply(incoming, ExecListReply(execs=execs))

    def on_logs(self, incoming: Incoming) -> None:
        body: ExecLogs = incoming.body
        ex = self.authorizer.authorized_exec(incoming, body.grant, body.exec_id)
        if ex is None:
            return
        assert incoming.sender is not None
        follow = self.topics.client_inbox(incoming.sender) if body.follow else None
        # base64 grows data by 4/3; leave room for the envelope and the JSON around it.
        budget = max(64 * 1024, (self.bus.config.max_payload - 64 * 1024) * 3 // 4)

        def reply(view: LogsView) -> None:
            self.bus.reply(incoming, ExecLogsReply(
                exec_id=ex.exec_id, chunks=[c.to_wire() for c in view.chunks],
                state="exited" if view.exit is not None else "running",
                first_seq=view.first_seq,
                exit=view.exit.to_dict() if view.exit is not None else None,
                following=view.following,
            ))

        ex.streamer.logs(body.from_seq or 0, budget, follow, reply)

    def on_stdin(self, incoming: Incoming) -> None:
        body: ExecStdin = incoming.body
        ex = self.authorizer.authorized_exec(incoming, body.grant, body.exec_id)
        if ex is None:
            return
        feed = ex.stdin
        if feed is None:
            self.bus.reply_error(incoming, "invalid",
                                 f"exec {ex.exec_id} was not started with stdin")
            return
        try:
            data = base64.b64decode(body.data, validate=True)
        except (binascii.Error, ValueError):
            self.bus.reply_error(incoming, "invalid", "stdin data is not base64")
            return
        if len(data) > STDIN_CHUNK_BYTES:
            self.bus.reply_error(incoming, "invalid",
                                 f"stdin pieces carry at most {STDIN_CHUNK_BYTES} bytes")
            return

        def answer(ack: ExecStdinAck) -> None:  # from the writer thread, too
            try:
                self.bus.reply(incoming, ack)
            except Exception as err:  # the client resends what it sees unanswered
                log.warning("cannot answer stdin piece %d of %s: %s", body.seq,
                            ex.exec_id, err)

        refusal = feed.offer(body.seq, data, bool(body.eof), answer)
        if refusal is not None:
            self.bus.reply_error(incoming, "conflict", refusal)

    def on_resize(self, incoming: Incoming) -> None:
        """The client's terminal changed size: set it on the command's pty."""
        body: ExecResize = incoming.body
        ex = self.authorizer.authorized_exec(incoming, body.grant, body.exec_id)
        if ex is None:
            return
        if not ex.tty:
            self.bus.reply_error(incoming, "invalid",
                                 f"exec {ex.exec_id} was not started with a tty")
            return
        if ex.exit is not None:  # a resize racing the exit is not an error
            self.bus.reply(incoming, Ok(detail={"exec_id": ex.exec_id, "state": "exited"}))
            return
        try:  # one ioctl (process) or one engine call (docker): quick
            self.executor.resize(ex.handle, body.rows, body.cols)
        except ExecutorError as err:
            self.bus.reply_error(incoming, "conflict", f"cannot resize {ex.exec_id}: {err}")
            return
        self.bus.reply(incoming, Ok(detail={"exec_id": ex.exec_id, "state": "running"}))


@dataclass
class _Piece:
    seq: int
    data: bytes
    eof: bool
    answer: Callable[[ExecStdinAck], None]


class StdinFeed:
    """A command's input, in order, deduplicated, bounded, written off the lane.

    ``spawn(target, name)`` runs the writer thread (started with the first piece).
    ``stop()`` ends it when the command is over (what is still held is answered closed).
    """

    def __init__(self, exec_id: str, sink: TaskInput,
                 spawn: Callable[[Callable[[], None], str], None],
                 window: int = STDIN_WINDOW) -> None:
        self.exec_id = exec_id
        self.sink = sink
        self.spawn = spawn
        self.window = window
        self._cond = threading.Condition()
        self._next = 0  # the next seq taken in order
        self._written = -1  # every seq up to this one is written
        self._queue: deque[_Piece] = deque()  # taken, not yet written
        self._early: dict[int, _Piece] = {}  # arrived before a gap was filled
        self._closed = False  # eof written, the reader gone, or stopped
        self._started = False
        self.bytes_written = 0

    def ack(self) -> ExecStdinAck:
        return ExecStdinAck(exec_id=self.exec_id, acked=self._written, closed=self._closed)

    def offer(self, seq: int, data: bytes, eof: bool,
              answer: Callable[[ExecStdinAck], None]) -> str | None:
        """Take a piece (``answer`` is called once it is written); a refusal text when
        it lies beyond the window."""
        now: ExecStdinAck | None = None
        with self._cond:
            if self._closed or seq < self._next or seq in self._early:
                now = self.ack()  # a resent piece, or input nobody reads: ignored
            elif seq > self._written + self.window:
                return (f"stdin piece {seq} is beyond the window: at most {self.window} "
                        f"may wait for their acknowledgement (acked {self._written})")
            else:
                if data and not eof and seq == self._next and not (self._queue or self._early):
                    n = self._write_now(data)
                    if n == len(data):
                        self._next += 1
                        self._written = seq
                        now = self.ack()
                    data = data[n:]  # the rest, if any, goes the writer thread's way
            if now is None:
                self._early[seq] = _Piece(seq, data, eof, answer)
                while self._next in self._early:
                    self._queue.append(self._early.pop(self._next))
                    self._next += 1
                if not self._started:
                    self._started = True
                    self.spawn(self._write_all, f"exec-{self.exec_id}-stdin")
                self._cond.notify_all()
        if now is not None:
            answer(now)
        return None

    def _write_now(self, data: bytes) -> int:
        """One non-blocking write of the next piece in order on the caller's thread (a
        keystroke then costs no hop to the writer thread): the count taken. Under
        ``_cond``, only while nothing is queued (the writer thread is idle)."""
        try:
            n = self.sink.write(data, 0.0)
        except OSError:
            return 0  # the writer thread meets the same error and ends the input
        self.bytes_written += n
        return n

    def stop(self) -> None:
        """The command is over: stop writing, answer what is held, close the pipe."""
        with self._cond:
            self._closed = True
            started = self._started
            self._cond.notify_all()
        if not started:
            self._finish()

    def _write_all(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    piece = self._queue[0]
                if not self._write(piece.data):
                    return
                if piece.eof:
                    self.sink.close()
                with self._cond:
                    self._queue.popleft()
                    self._written = piece.seq
                    self._closed = self._closed or piece.eof
                    ack = self.ack()
                piece.answer(ack)
        except Exception:
            log.exception("stdin of exec %s failed", self.exec_id)
        finally:
            self._finish()

    def _write(self, data: bytes) -> bool:
        """All of ``data`` into the pipe; False when input ended (reader gone, stopped)."""
        view = memoryview(data)
        while view:
            try:
                n = self.sink.write(view, WRITE_POLL_S)
            except OSError as err:  # EPIPE: the command closed its stdin or exited
                if err.errno not in (errno.EPIPE, errno.EBADF, None):
                    log.info("stdin of exec %s: %s", self.exec_id, err)
                return False
            view = view[n:]
            self.bytes_written += n
            if not n and self._closed:
                return False
        return True

    def _finish(self) -> None:
        """Input is over: close the pipe, answer every piece still held (closed)."""
        self.sink.close()
        with self._cond:
            self._closed = True
            held = list(self._queue) + list(self._early.values())
            self._queue.clear()
            self._early.clear()
            ack = self.ack()
        for piece in held:
            try:
                piece.answer(ack)
            except Exception:
                log.debug("cannot answer stdin piece %d of %s", piece.seq, self.exec_id)
