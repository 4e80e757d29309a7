"""A reserved worker: the handle ``Grid.reserve`` returns, and the lease keeper behind it.

    with grid.reserve(0) as w:              # index, id, name, or None / any={...}
        print(w.run("uname -a").text)
        for chunk in w.stream("make -j4"):  # live, in order
            sys.stdout.buffer.write(chunk.data)

The coordinator grants a reservation for a lease (default 30 s); the handle keeps it
alive by renewing every lease/3 on a background thread, and each renewal brings a fresh
grant, which every ``exec.*`` request to the worker carries. When the coordinator ends
the reservation (worker lost, lease expired, admin), ``reservation.ended`` marks the
handle ended and every waiter gets :class:`ReservationLost`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from broker.bus import Bus, BusError, RemoteError, RequestTimeout
from broker.config import Config
from client import validation
from client.errors import ClientError, InvalidRequest, Unreachable
from client.exec_stream import ExecResult, ExecStream, OutputChunk, StdinSender, decode_data
from schemas.errors import WireError
from schemas.exec_messages import ExecResize, ExecStdin, ExecStdinAck
from schemas.messages import (
    Body,
    Error,
    ExecList,
    ExecListReply,
    ExecLogs,
    ExecLogsReply,
    ExecSignal,
    ExecStart,
    ExecStarted,
    Release,
    Renew,
    ReserveReply,
)
from schemas.topics import Topics

if TYPE_CHECKING:
    import os

    from client.data import DataRef
    from client.file_copy import CopyResult, DataPlacement

log = logging.getLogger(__name__)

# What each request to a worker asks for, in words (for refusals).
_ACTIONS = {"exec.start": "to run the command", "exec.signal": "to signal the command",
            "exec.list": "to list the commands", "exec.logs": "to send the output",
            "exec.stdin": "to take the command's input",
            "exec.resize": "to resize the terminal",
            "workdir.fetch": "to place the data object"}
SIGNALS = ("INT", "TERM", "KILL", "HUP", "QUIT", "USR1", "USR2")
# After exec.exit, how long to keep asking the worker for missing chunks before giving up.
GIVE_UP_AFTER_EXIT_S = 5.0


class GridLink(Protocol):
    """What a reserved worker needs of the ``client.api.Grid`` that made it: a Protocol,
    so that this module does not import client.api (which imports this one)."""

    bus: Bus
    topics: Topics
    config: Config

    def ask(self, body: Any, timeout: float | None = None, *, what: str | None = None
            ) -> Any:
        """Ask the coordinator: its reply body; ``Refused``/``ClientError`` otherwise."""

    def route_stream(self, stream: ExecStream, handle: ReservedWorker) -> None:
        """Deliver the output and exit of ``stream.exec_id`` to ``stream``."""

    def unroute_stream(self, stream: ExecStream) -> None:
        """Stop delivering to ``stream``."""

    def forget(self, handle: ReservedWorker) -> None:
        """``handle`` ended: it is no longer held."""


class ReservationLost(ClientError):
    """The reservation ended (released, expired, worker lost, admin) while in use."""

    def __init__(self, reservation: str, reason: str) -> None:
        super().__init__(f"reservation {reservation} ended: {reason}")
        self.reservation = reservation
        self.reason = reason


class Refused(ClientError):
    """The coordinator or the worker answered with an ``error``; ``code`` says which kind."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ExecInfo:
    """One row of ``ps``: a command this reservation started."""

    exec_id: str
    command: str
    state: str
    mode: str = ""
    pid: int | None = None
    started_at: float | None = None
    exit_code: int | None = None
    duration_s: float | None = None

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ExecInfo:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


def new_exec_id() -> str:
    """Client-chosen exec id: short, unique per reservation, matches ``[A-Za-z0-9_.-]``."""
    return uuid.uuid4().hex[:12]


class ReservationKeeper(threading.Thread):
    """Renews one reservation every lease/3 until it is released or ends.

    A renewal that times out (broker or coordinator away) is retried sooner; a refusal
    means the coordinator no longer knows the reservation as ours, so the handle ends.
    """

    def __init__(self, handle: ReservedWorker) -> None:
        super().__init__(name=f"xcloud-keeper-{handle.id}", daemon=True)
        self.handle = handle
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        interval = self.handle.renew_interval
        while not self._stop_event.wait(interval):
            if self.handle.ended:
                return
            try:
                self.handle.renew()
                interval = self.handle.renew_interval
            except ReservationLost:
                return
            except (ClientError, BusError) as err:
                left = self.handle.time_left()
                log.warning("renewing reservation %s failed (%s); %.0fs of lease left",
                            self.handle.id, err, left)
                interval = max(0.5, min(self.handle.renew_interval, left / 3))


class ReservedWorker:
    """A worker held by this client: run commands on it, then release it.

    A context manager (releases on exit). Attributes after each renewal: ``id`` (the
    reservation), ``worker`` (its id), ``worker_name``, ``expires_at``, ``grant``.
    """

    def __init__(self, grid: GridLink, reply: ReserveReply, lease_s: float) -> None:
        self._grid = grid
        self._lock = threading.Lock()
        self._lease_s = lease_s
        self._apply(reply)
        self.ended_reason: str | None = None
        self._ended = threading.Event()
        self._streams: dict[str, ExecStream] = {}
        self._kill_on_close: set[str] = set()
        self._end_listeners: list[Callable[[ReservedWorker], None]] = []
        self._keeper = ReservationKeeper(self)

    def _apply(self, reply: ReserveReply) -> None:
        res = dict(reply.reservation)
        with self._lock:
            self.reservation = res
            self.id: str = res["id"]
            self.worker: str = res["worker"]
            self.worker_name: str = res.get("worker_name") or res["worker"]
            self.expires_at: float = float(res["expires_at"])
            self.grant: str = reply.grant
            if res.get("lease_s"):
                self._lease_s = float(res["lease_s"])

    def _start_keeper(self) -> None:
        self._keeper.start()

    def __repr__(self) -> str:
        state = f"ended: {self.ended_reason}" if self.ended else f"{self.time_left():.0f}s left"
        return f"<ReservedWorker {self.id} on {self.worker} ({state})>"

    # -- lease ---------------------------------------------------------------------------

    @property
    def lease_s(self) -> float:
        return self._lease_s

    @property
    def renew_interval(self) -> float:
        return max(0.5, self._lease_s / 3)

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def time_left(self) -> float:
        """Seconds until the lease runs out unless renewed (0 once ended)."""
        return 0.0 if self.ended else max(0.0, self.expires_at - time.time())

    def renew(self) -> None:
        """Extend the lease now and take the fresh grant (the keeper does this by itself)."""
        self._check()
        try:
            reply: ReserveReply = self._grid.ask(Renew(reservation=self.id),
                                                 what=f"renew reservation {self.id}")
        except Refused as err:
            if err.code in ("not_found", "conflict", "forbidden"):
                self._mark_ended(f"renewal refused: {err}")
                raise ReservationLost(self.id, self.ended_reason or str(err)) from err
            raise Refused(f"renewing reservation {self.id} was refused: {err}",
                          err.code) from err
        self._apply(reply)

    def on_ended(self, listener: Callable[[ReservedWorker], None]) -> None:
        """Call ``listener(handle)`` (on a bus thread) when the reservation ends."""
        self._end_listeners.append(listener)
        if self.ended:
            listener(self)

    def _mark_ended(self, reason: str) -> None:
        """The reservation is over: stop renewing, fail the waiters, tell the listeners."""
        with self._lock:
            if self._ended.is_set() or self.ended_reason is not None:
                return
            self.ended_reason = reason
            streams = list(self._streams.values())
        # Forget it before anyone can see it ended: `ended` implies "not held".
        self._grid.forget(self)
        self._ended.set()
        self._keeper.stop()
        if self._keeper.is_alive() and self._keeper is not threading.current_thread():
            self._keeper.join(2)  # it only waits on its stop event or a short request
        lost = ReservationLost(self.id, reason)
        for stream in streams:
            stream.fail(lost)
        for listener in list(self._end_listeners):
            try:
                listener(self)
            except Exception:
                log.exception("reservation end listener failed")
        log.info("reservation %s on %s ended: %s", self.id, self.worker, reason)

    def release(self) -> None:
        """End the reservation (idempotent). The worker stops its commands and cleans up."""
        if self.ended:
            return
        self._keeper.stop()
        try:
            self._grid.ask(Release(reservation=self.id), what=f"release reservation {self.id}")
        except Refused as err:
            if err.code not in ("not_found", "conflict"):
                raise Refused(f"releasing reservation {self.id} was refused: {err}",
                              err.code) from err
        finally:
            self._mark_ended("released")

    def __enter__(self) -> ReservedWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.release()
        except ClientError as err:
            log.warning("could not release reservation %s: %s", self.id, err)

    # -- requests to the worker --------------------------------------------------------

    def _check(self) -> None:
        if self.ended:
            raise ReservationLost(self.id, self.ended_reason or "ended")

    def _request(self, body: Body, timeout: float | None = None) -> Any:
        self._check()
        inbox = self._grid.topics.worker_inbox(self.worker)
        try:
            return self._grid.bus.request(inbox, body, timeout=timeout).body
        except RemoteError as err:
            if err.code == "forbidden" and not self.ended:
                # Perhaps the reservation ended and its reservation.ended was lost (we
                # were disconnected): a renewal tells, and ends the handle if so.
                with contextlib.suppress(ClientError, BusError):
                    self.renew()
            self._check()  # a refusal because the reservation ended says so
            action = _ACTIONS.get(body.TYPE, body.TYPE)
            raise Refused(f"worker {self.worker_name} refused {action}: {err}",
                          err.code) from err
        except RequestTimeout as err:
            self._check()
            limit = self._grid.config.bus.request_timeout_s if timeout is None else timeout
            raise Unreachable(f"worker {self.worker_name} did not answer within {limit:g}s "
                              "(it may be busy, or lost: see `xcloud workers`)") from err
        except WireError as err:
            raise InvalidRequest(f"cannot send this to worker {self.worker_name}: "
                                 f"{err.reason}") from err
        except BusError as err:
            raise Unreachable(f"cannot reach worker {self.worker_name}: {err}") from err

    def _exec(self, command: str, mode: str, *, timeout: float | None,
              env: dict[str, str] | None, max_output_bytes: int | None,
              keep_output: bool, buffer_chunks: bool, stdin: bool = False,
              tty: dict[str, Any] | None = None) -> tuple[str, ExecStream | None]:
        if command or tty is None:  # with a tty, no command is the login shell
            validation.check_command(command)
        validation.check_timeout(timeout)
        exec_id = new_exec_id()
        stream: ExecStream | None = None
        if mode == "output":
            # Registered before exec.start: output may overtake the exec.started reply.
            stream = ExecStream(exec_id, keep_output=keep_output, buffer_chunks=buffer_chunks,
                                stall_s=self._grid.config.client.stall_s,
                                on_stall=self._resync, on_close=self._close_stream)
            self._attach(stream)
        try:
            started: ExecStarted = self._request(ExecStart(
                grant=self.grant, exec_id=exec_id, command=command, mode=mode,
                timeout_s=timeout, max_output_bytes=max_output_bytes, env=env or None,
                stdin=stdin or None, tty=tty))
        except BaseException:
            if stream is not None:
                self._detach(stream)
            raise
        if (stdin or tty is not None) and stream is not None:
            stream.stdin = self._stdin_sender(exec_id)
        log.debug("exec %s started on %s (pid %s): %s", exec_id, self.worker, started.pid,
                  command)
        return exec_id, stream

    def run(self, command: str, timeout: float | None = None,
            env: dict[str, str] | None = None, *,
            max_output_bytes: int | None = None,
            input: bytes | str | None = None) -> ExecResult:
        """Run ``command`` with ``/bin/sh -c`` in the reservation's work dir; wait for it.

        ``timeout`` (seconds) is enforced by the worker (the result says ``timed_out``).
        ``input`` (bytes, or str as UTF-8) is the command's stdin, as with
        ``subprocess.run``; without it the command reads EOF.
        """
        _, stream = self._exec(command, "output", timeout=timeout, env=env,
                               max_output_bytes=max_output_bytes, keep_output=True,
                               buffer_chunks=False, stdin=input is not None)
        assert stream is not None
        with stream:
            if stream.stdin is not None and input is not None:
                with stream.stdin:
                    stream.stdin.write(input)
            return stream.wait()

    def stream(self, command: str, timeout: float | None = None,
               env: dict[str, str] | None = None, *, max_output_bytes: int | None = None,
               keep_output: bool = False, stdin: bool = False) -> ExecStream:
        """Run ``command`` and iterate its output chunks as they arrive, in order.

        After the iteration ``.result`` holds the exit (and the output too with
        ``keep_output``). Closing the stream before the command ended stops it (TERM).
        With ``stdin``, ``.stdin`` is the command's input (``write(data)``, ``close()``;
        write from another thread than the one iterating when both may block).
        """
        _, stream = self._exec(command, "output", timeout=timeout, env=env,
                               max_output_bytes=max_output_bytes, keep_output=keep_output,
                               buffer_chunks=True, stdin=stdin)
        assert stream is not None
        return stream

    def terminal(self, command: str = "", *, rows: int = 24, cols: int = 80,
                 term: str | None = None, timeout: float | None = None,
                 env: dict[str, str] | None = None) -> ExecStream:
        """Run ``command`` (empty: the worker user's login shell) on a pseudo-terminal of
        ``rows`` x ``cols``: iterate its output (stdout and stderr merged, raw terminal
        bytes), type into ``.stdin`` (``write``; ``b"\\x03"`` is a Ctrl-C there), and
        ``resize(exec_id, rows, cols)`` when the window changes. client/terminal.py
        drives one from a local terminal (``xcloud attach``)."""
        tty: dict[str, Any] = {"rows": max(1, min(1000, rows)), "cols": max(1, min(1000, cols))}
        if term:
            tty["term"] = term
        _, stream = self._exec(command, "output", timeout=timeout, env=env,
                               max_output_bytes=None, keep_output=False,
                               buffer_chunks=True, tty=tty)
        assert stream is not None
        return stream

    @property
    def connected(self) -> bool:
        """Is this client connected to the broker right now?"""
        return self._grid.bus.connected.is_set()

    def resize(self, exec_id: str, rows: int, cols: int) -> Any:
        """Tell a command started by ``terminal`` its new window size; returns at once
        (a future of the worker's answer: a resize is never worth waiting for)."""
        self._check()
        try:
            return self._grid.bus.request_async(
                self._grid.topics.worker_inbox(self.worker),
                ExecResize(grant=self.grant, exec_id=exec_id, rows=max(1, min(1000, rows)),
                           cols=max(1, min(1000, cols))))
        except BusError as err:
            raise Unreachable(f"cannot reach worker {self.worker_name}: {err}") from err

    def start(self, command: str, timeout: float | None = None,
              env: dict[str, str] | None = None, *,
              max_output_bytes: int | None = None) -> str:
        """Start ``command`` in the background; its exec id (see ``ps`` and ``logs``)."""
        exec_id, _ = self._exec(command, "background", timeout=timeout, env=env,
                                max_output_bytes=max_output_bytes, keep_output=False,
                                buffer_chunks=False)
        return exec_id

    def ps(self) -> list[ExecInfo]:
        """The commands of this reservation, running and finished."""
        reply: ExecListReply = self._request(ExecList(grant=self.grant))
        return [ExecInfo.from_wire(row) for row in reply.execs]

    def logs(self, exec_id: str, follow: bool = False) -> Iterator[OutputChunk]:
        """The output the worker kept for ``exec_id``; with ``follow``, until it exits."""
        stream = ExecStream(exec_id, start_seq=None, keep_output=False, buffer_chunks=True,
                            stall_s=self._grid.config.client.stall_s,
                            on_stall=self._resync if follow else None,
                            on_close=self._close_stream)
        if follow:
            self._attach(stream, kill_on_close=False)
        try:
            reply: ExecLogsReply = self._request(ExecLogs(grant=self.grant, exec_id=exec_id,
                                                          follow=follow or None))
        except BaseException:
            self._detach(stream)
            raise
        chunks = [(int(c["seq"]), str(c["stream"]), decode_data(c["data"]))
                  for c in reply.chunks]
        first = reply.first_seq if reply.first_seq is not None else (
            chunks[0][0] if chunks else 0)
        if not follow or not (reply.following or reply.exit is not None):
            self._detach(stream)
            return iter([OutputChunk(s, d, q) for q, s, d in chunks])
        stream.set_base(first)
        for seq, name, data in chunks:
            stream.feed(seq, name, data)
        if reply.exit is not None:
            stream.feed_exit(_exit_info(reply.exit, chunks, first))
        return stream

    def signal(self, exec_id: str, signal: str = "TERM") -> None:
        """Send ``signal`` (INT TERM KILL HUP QUIT USR1 USR2) to the command's group."""
        name = signal.upper().removeprefix("SIG")
        if name not in SIGNALS:
            raise ClientError(f"unknown signal {signal!r}: use one of {', '.join(SIGNALS)}")
        self._request(ExecSignal(grant=self.grant, exec_id=exec_id, signal=name))

    def kill(self, exec_id: str, signal: str = "TERM") -> None:
        """Stop a command (TERM by default)."""
        self.signal(exec_id, signal)

    def interrupt(self, exec_id: str) -> None:
        """What Ctrl-C does: SIGINT to the command's process group."""
        self.signal(exec_id, "INT")

    def _stdin_sender(self, exec_id: str) -> StdinSender:
        """The stdin of ``exec_id``: pieces as ``exec.stdin`` requests, answers as credit."""
        inbox = self._grid.topics.worker_inbox(self.worker)

        def send(seq: int, data: bytes, eof: bool) -> Any:
            self._check()
            try:
                return self._grid.bus.request_async(inbox, ExecStdin(
                    grant=self.grant, exec_id=exec_id, seq=seq,
                    data=base64.b64encode(data).decode("ascii"), eof=eof or None))
            except BusError as err:
                raise Unreachable(f"cannot reach worker {self.worker_name}: {err}") from err

        def read_ack(reply: Any) -> tuple[int, bool]:
            body = reply.body
            if isinstance(body, ExecStdinAck):
                return body.acked, body.closed
            if isinstance(body, Error) and body.code == "not_found":
                return -1, True  # the command is gone: nobody reads any more
            self._check()
            code = body.code if isinstance(body, Error) else "internal"
            raise Refused(f"worker {self.worker_name} refused to take the command's input: "
                          f"{getattr(body, 'message', body)}", code)

        return StdinSender(exec_id, send, read_ack, check=self._check,
                           resend_s=self._grid.config.bus.request_timeout_s)

    # -- files (client/file_copy.py) -------------------------------------------------------

    def put(self, local: str | os.PathLike[str], remote: str | None = None, *,
            progress: Callable[[int, int], None] | None = None) -> CopyResult:
        """Copy a local file or directory into the work directory (default: its own
        name there). The worker keeps it until the reservation ends."""
        from client.file_copy import put

        return put(self, local, remote, progress=progress)

    def get(self, remote: str, local: str | os.PathLike[str] | None = None, *,
            progress: Callable[[int, int], None] | None = None) -> CopyResult:
        """Copy a file or directory of the work directory here (default: its own name
        in the current directory)."""
        from client.file_copy import get

        return get(self, remote, local, progress=progress)

    def put_data(self, ref: DataRef | str, remote: str | None = None) -> DataPlacement:
        """Place a stored data object (a name, hash or ``DataRef``, as ``grid.data.get``
        takes) in the work directory; the worker fetches it through its input cache."""
        from client.file_copy import put_data

        return put_data(self, ref, remote)

    # -- stream bookkeeping --------------------------------------------------------------

    def _attach(self, stream: ExecStream, kill_on_close: bool = True) -> None:
        with self._lock:
            self._streams[stream.exec_id] = stream
            if kill_on_close:
                self._kill_on_close.add(stream.exec_id)
        self._grid.route_stream(stream, self)

    def _detach(self, stream: ExecStream) -> None:
        with self._lock:
            if self._streams.get(stream.exec_id) is stream:
                del self._streams[stream.exec_id]
                self._kill_on_close.discard(stream.exec_id)
        self._grid.unroute_stream(stream)

    def _close_stream(self, stream: ExecStream) -> None:
        """A consumer stopped following: forget the stream; stop its command if running."""
        with self._lock:
            kill = stream.exec_id in self._kill_on_close
        self._detach(stream)
        if kill and not stream.exited and stream.error is None and not self.ended:
            try:
                # Fire and forget: no reply_to, so nothing to wait for.
                self._grid.bus.send(self._grid.topics.worker_inbox(self.worker),
                                    ExecSignal(grant=self.grant, exec_id=stream.exec_id,
                                               signal="TERM"))
            except (BusError, WireError, ValueError) as err:
                log.debug("could not stop exec %s: %s", stream.exec_id, err)

    def _resync(self, stream: ExecStream) -> None:
        """Ask the worker for what the stream misses (lost chunks, lost exit)."""
        self._check()
        start = stream.next_seq or 0
        reply: ExecLogsReply | None = None
        try:
            reply = self._request(ExecLogs(grant=self.grant, exec_id=stream.exec_id,
                                           from_seq=start))
        except ReservationLost:
            raise
        except ClientError as err:
            log.info("exec %s: resync failed: %s", stream.exec_id, err)
        if reply is not None:
            chunks = [(int(c["seq"]), str(c["stream"]), decode_data(c["data"]))
                      for c in reply.chunks]
            first = reply.first_seq if reply.first_seq is not None else (
                chunks[0][0] if chunks else None)
            if first is not None and first > start:
                stream.skip_to(first)
            for seq, name, data in chunks:
                stream.feed(seq, name, data)
            if reply.state == "exited" and reply.exit is not None:
                stream.feed_exit(_exit_info(reply.exit, chunks, first or start))
        since = stream.exited_for
        if not stream.complete and since is not None and since > GIVE_UP_AFTER_EXIT_S:
            stream.give_up()


def _exit_info(exit_doc: dict[str, Any], chunks: list[tuple[int, str, bytes]],
               first: int) -> dict[str, Any]:
    """An ``exec.logs`` exit document as ``exec.exit`` fields (``last_seq`` filled in)."""
    info = dict(exit_doc)
    if "last_seq" not in info:
        info["last_seq"] = chunks[-1][0] if chunks else first - 1
    info.setdefault("duration_s", 0.0)
    return info
