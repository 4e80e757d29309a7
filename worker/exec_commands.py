"""Running one remote command: ``exec.start``, then supervising it to its end.

Each command gets an output streamer thread (worker.output). No thread waits for it:
the executor calls back when it has ended (``Executor.notify_exit``; the process driver
from its I/O loop, worker/io_loop.py), and its timeout is a timer on that loop that hands
the (blocking) stop to a thread. The exit callback hands ``exec.exit`` to the streamer,
which sends it after the last output chunk; once it has, the streamer thread reports the
command to the coordinator (``exec.report``). The exit facts come from the executor's
``ExitResult``; both messages take them from ``Outcome``.
"""

from __future__ import annotations

import logging
import re
import signal as _signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.bus import Bus, Incoming
from broker.config import WorkerConfig
from schemas.messages import ExecExit, ExecReport, ExecStart, ExecStarted
from schemas.outcome import ERROR_MAX
from schemas.topics import Topics
from worker.exec_auth import ExecAuthorizer
from worker.exec_requests import StdinFeed
from worker.exec_sessions import Session, Spawn
from worker.executors.base import (
    Executor,
    ExecutorError,
    ExitResult,
    TaskHandle,
    TaskSpec,
    TtySize,
)
from worker.io_loop import IoLoop, Timer, shared
from worker.output import OutputStreamer
from worker.terminal import TTY_LINGER_S

log = logging.getLogger(__name__)

MAX_RUNNING_PER_SESSION = 64
KEEP_EXITED_PER_SESSION = 100  # exited commands kept for exec.list / exec.logs
LIST_COMMAND_CHARS = 1024
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Command:
    """One remote command of a session, from ``exec.start`` until it is forgotten."""

    exec_id: str
    rid: str
    client: str
    command: str
    mode: str
    handle: TaskHandle
    streamer: OutputStreamer
    timeout_s: float | None
    started_at: float
    exit: ExecExit | None = None
    stop_reason: str | None = None
    stdin: StdinFeed | None = None  # started with stdin: true (or a tty)
    tty: bool = False  # on a pseudo-terminal (worker/terminal.py)
    done: threading.Event = field(default_factory=threading.Event)
    timed_out: bool = False
    timer: Timer | None = None  # its timeout, on the I/O loop
    ended: bool = False  # the exit was taken (once: the executor's, or a failed stop's)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def state(self) -> str:
        return "running" if self.exit is None else "exited"

    def summary(self) -> dict[str, Any]:
        return {
            "exec_id": self.exec_id,
            "command": self.command[:LIST_COMMAND_CHARS],
            "mode": self.mode,
            "state": self.state,
            "pid": self.handle.pid,
            "started_at": self.started_at,
            "exit_code": None if self.exit is None else self.exit.exit_code,
            "duration_s": (time.time() - self.started_at if self.exit is None
                           else self.exit.duration_s),
        }


class CommandRunner:
    """``exec.start`` and everything that follows it, up to ``exec.report``."""

    def __init__(self, bus: Bus, topics: Topics, wid: str, config: WorkerConfig,
                 executor: Executor, authorizer: ExecAuthorizer, *,
                 stopping: threading.Event, spawn: Spawn, kill_grace_s: float,
                 chunk_bytes: int, linger_s: float,
                 send_report: Callable[[ExecReport], None] | None,
                 loop: IoLoop | None = None,
                 run_streamer: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.bus = bus
        self.topics = topics
        self.wid = wid
        self.config = config
        self.executor = executor
        self.authorizer = authorizer
        self.stopping = stopping
        self.spawn = spawn
        self.kill_grace_s = kill_grace_s
        self.chunk_bytes = chunk_bytes
        self.linger_s = linger_s
        self.send_report = send_report  # None: this worker reports to nobody
        self.loop = loop or executor.io_loop or shared()  # shared: for timers only
        self.run_streamer = run_streamer  # reused threads for the output streamers

    def on_start(self, incoming: Incoming) -> None:
        body: ExecStart = incoming.body
        auth = self.authorizer.authorize(incoming, body.grant)
        if auth is None:
            return
        _claims, session = auth
        client = incoming.sender
        assert client is not None
        env = dict(body.env or {})
        bad = [k for k, v in env.items() if not _ENV_NAME.match(k) or "\0" in v]
        if bad:
            self.bus.reply_error(incoming, "invalid", f"invalid environment variable {bad[0]!r}")
            return
        if body.stdin and not self.executor.capabilities().stdin:
            self.bus.reply_error(incoming, "unsupported",
                                 f"the {self.executor.name} executor gives commands no stdin")
            return
        if body.tty is not None and not self.executor.capabilities().tty:
            self.bus.reply_error(incoming, "unsupported", f"the {self.executor.name} "
                                 "executor gives commands no terminal")
            return
        if not body.command.strip() and body.tty is None:  # no command: a tty's login shell
            self.bus.reply_error(incoming, "invalid", "empty command")
            return
        timeout = _timeout(body.timeout_s, self.config.exec_timeout_s)
        launched = self._launch(session, body, client, env, timeout)
        if not isinstance(launched, Command):
            code, message = launched
            detail = {"reason": "reservation_not_open"} if code == "forbidden" else None
            self.bus.reply_error(incoming, code, message, detail=detail)
            return
        ex = launched
        log.info("exec %s in %s for %s (%s): %s", ex.exec_id, ex.rid, client, ex.mode,
                 ex.command[:200])
        try:
            self.bus.reply(incoming, ExecStarted(exec_id=ex.exec_id, pid=ex.handle.pid,
                                                 started_at=ex.started_at))
        finally:  # the streamer starts after the reply: exec.started precedes any output
            ex.streamer.start(self.run_streamer)
            self._watch(ex)

    def _launch(self, session: Session, body: ExecStart, client: str, env: dict[str, str],
                timeout: float | None) -> Command | tuple[str, str]:
        """Start the command under the session's lock (a close cannot slip in between);
        returns the command, or (error code, message)."""
        tty = None if body.tty is None else TtySize.from_wire(body.tty)
        streamer = OutputStreamer(
            body.exec_id, self.bus.send, send_bytes=self._send_bytes,
            max_bytes=_output_cap(body.max_output_bytes, self.config.max_output_bytes),
            ring_bytes=self.config.log_ring_bytes,
            chunk_bytes=self.chunk_bytes,
            linger_s=self.linger_s if tty is None else TTY_LINGER_S,
        )
        if body.mode == "output":
            streamer.add_target(self.topics.client_inbox(client))
        with session.lock:
            if self.stopping.is_set():
                return "unavailable", f"worker {self.wid} is stopping"
            if session.closing:
                return "forbidden", f"reservation {session.rid} is closing"
            if body.exec_id in session.used:
                return "conflict", (f"exec id {body.exec_id} was already used in "
                                    f"reservation {session.rid}")
            if len(session.running()) >= MAX_RUNNING_PER_SESSION:
                return "conflict", (f"{MAX_RUNNING_PER_SESSION} commands are already "
                                    "running in this reservation")
            spec = TaskSpec(task_id=body.exec_id, command=body.command,
                            session=session.handle, env=env, timeout_s=timeout,
                            stdin=bool(body.stdin) or tty is not None, tty=tty)
            try:
                handle = self.executor.start(spec, streamer)
                sink = self.executor.task_input(handle) if spec.stdin else None
            except ExecutorError as err:
                return "internal", f"cannot start the command: {err}"
            ex = Command(exec_id=body.exec_id, rid=session.rid, client=client,
                         command=body.command or "(login shell)",  # ps, the audit
                         mode=body.mode, handle=handle,
                         streamer=streamer, timeout_s=timeout,
                         started_at=handle.started_at or time.time(),
                         stdin=None if sink is None else StdinFeed(body.exec_id, sink,
                                                                   self.spawn),
                         tty=tty is not None)
            session.used.add(body.exec_id)
            session.execs[body.exec_id] = ex
            _prune(session)
        return ex

    def _watch(self, ex: Command) -> None:
        """Arm the command's timeout and learn of its end (no thread waits for it)."""
        if ex.timeout_s is not None:
            ex.timer = self.loop.call_later(ex.timeout_s, self._timed_out, ex)
        try:
            self.executor.notify_exit(ex.handle, lambda result: self._exited(ex, result))
        except Exception as err:
            log.exception("watching exec %s failed", ex.exec_id)
            self._exited(ex, ExitResult(exit_code=None, error=f"internal error: {err}"))

    def _timed_out(self, ex: Command) -> None:
        """On the loop: stopping blocks (TERM, the grace, KILL), so a thread does it."""
        with ex.lock:
            if ex.ended:
                return
            ex.timed_out = True
        log.info("exec %s timed out after %ss; stopping it", ex.exec_id, ex.timeout_s)
        self.spawn(lambda: self._stop_timed_out(ex), f"exec-{ex.exec_id}-timeout")

    def _stop_timed_out(self, ex: Command) -> None:
        try:
            result = self.executor.stop(ex.handle, self.kill_grace_s)
        except Exception as err:
            log.exception("stopping exec %s failed", ex.exec_id)
            result = ExitResult(exit_code=None, error=f"internal error: {err}")
            self._exited(ex, result)
        if result is None:  # its exit never came: end it here
            self._exited(ex, ExitResult(exit_code=None, error="the command did not stop"))

    def _exited(self, ex: Command, result: ExitResult) -> None:
        """The command ended (from the executor's loop, usually): hand exec.exit to the
        streamer, which sends it after the last output and then calls ``_sent``."""
        with ex.lock:
            if ex.ended:
                return
            ex.ended = True
        if ex.timer is not None:
            ex.timer.cancel()
        if ex.stdin is not None:
            ex.stdin.stop()  # pieces still held are answered "closed"
        streamer = ex.streamer
        streamer.close_input()
        error = result.error or ex.stop_reason
        exit_body = ExecExit(  # the streamer fills in last_seq, truncated, output_bytes
            exec_id=ex.exec_id, last_seq=-1,
            duration_s=max(0.0, float(result.duration_s)),
            exit_code=result.exit_code, signal=result.signal,
            timed_out=ex.timed_out or result.timed_out, truncated=False,
            oom_killed=result.oom_killed, error=error[:ERROR_MAX] if error else None,
            output_bytes=0,
        )
        ex.exit = exit_body  # exited, as far as exec.list is concerned
        streamer.finish(exit_body, lambda: self._sent(ex, exit_body))

    def _sent(self, ex: Command, exit_body: ExecExit) -> None:
        """On the streamer thread, once exec.exit went out (or the streamer was aborted)."""
        exit_body = ex.streamer.exit or exit_body
        ex.exit = exit_body
        log.info("exec %s in %s ended: exit %s signal %s%s", ex.exec_id, ex.rid,
                 exit_body.exit_code, exit_body.signal, " (timed out)" if ex.timed_out else "")
        try:
            if self.send_report is not None:
                self._report(ex, exit_body, self.send_report)
        finally:
            ex.done.set()

    def _report(self, ex: Command, exit_body: ExecExit,
                send: Callable[[ExecReport], None]) -> None:
        report = ExecReport(
            reservation=ex.rid, client=ex.client, exec_id=ex.exec_id, command=ex.command,
            started_at=ex.started_at, mode=ex.mode, **exit_body.outcome_fields(),
        )
        try:
            send(report)  # worker/exec_reports.py: kept until the coordinator acknowledges
        except Exception:
            log.exception("cannot report exec %s to the coordinator", ex.exec_id)

    def stop_all(self, execs: list[Command], reason: str) -> None:
        """Stop these commands (TERM, KILL after the grace) and wait for their ends."""
        for ex in execs:
            ex.stop_reason = ex.stop_reason or reason
            try:
                self.executor.signal(ex.handle, _signal.SIGTERM)
            except ExecutorError as err:
                log.debug("signal TERM to %s: %s", ex.exec_id, err)
        deadline = time.monotonic() + self.kill_grace_s
        for ex in execs:
            ex.done.wait(max(0.0, deadline - time.monotonic()))
        for ex in execs:
            if not ex.done.is_set():
                try:
                    self.executor.stop(ex.handle, 0.5)
                except ExecutorError as err:
                    log.warning("cannot stop %s: %s", ex.exec_id, err)
        for ex in execs:
            if not ex.done.wait(5.0):
                ex.streamer.abort()  # e.g. the broker is gone: do not wait for PUBACKs
                ex.done.wait(2.0)

    def _send_bytes(self, base_inbox: str, payload: bytes) -> Any:
        """Publish pre-encoded output into an inbox under our id (like ``Bus.send``)."""
        topic = self.topics.inbox_for(base_inbox, self.bus.principal)
        return self.bus.publish_bytes(topic, payload, qos=1)


def _prune(session: Session) -> None:
    """Forget the oldest exited commands beyond the keep limit (ids stay used)."""
    exited = [e.exec_id for e in session.execs.values() if e.exit is not None]
    for exec_id in exited[: max(0, len(exited) - KEEP_EXITED_PER_SESSION)]:
        del session.execs[exec_id]


def _timeout(requested: float | None, worker_max: float) -> float | None:
    """The requested timeout capped by the worker's; None = no timeout (0 = none)."""
    values = [float(v) for v in (requested, worker_max) if v and v > 0]
    return min(values) if values else None


def _output_cap(requested: int | None, worker_max: int) -> int:
    """The requested output cap (0 allowed) capped by the worker's (0 = no cap)."""
    values = [int(v) for v in (requested,) if v is not None]
    values += [int(worker_max)] if worker_max and worker_max > 0 else []
    return min(values) if values else 2**62
