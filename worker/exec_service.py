"""ExecService: the worker side of reservations and remote commands (docs/protocol.md).

It owns the protocol; the executor only runs things. On the worker's inbox it handles

- ``reservation.open`` / ``reservation.close`` from the coordinator principal only:
  open (and persist) or close (stop commands, remove the work dir) a session;
- ``exec.start`` / ``exec.signal`` / ``exec.list`` / ``exec.logs`` from clients, each
  under a grant that must verify with the coordinator's key, name this worker and the
  *sending* principal, be unexpired, and belong to a session open here. Otherwise the
  answer is ``forbidden`` (``detail.reason`` = why) and nothing runs (invariant 2).

Handlers run on one bus lane and only do quick work; each command gets a supervisor
thread (wait, timeout, exit, report) and an output streamer thread (worker.output), and
closing a reservation runs in a thread of its own, so a slow stop never blocks the lane.
"""

from __future__ import annotations

import logging
import os
import re
import signal as _signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.bus import Bus, Incoming, Lane
from broker.config import WorkerConfig
from schemas.grants import (
    GrantClaims,
    GrantError,
    public_key_bytes,
    public_key_from_text,
    verify_grant,
)
from schemas.messages import (
    CoordPubkey,
    ExecExit,
    ExecList,
    ExecListReply,
    ExecLogs,
    ExecLogsReply,
    ExecReport,
    ExecSignal,
    ExecStart,
    ExecStarted,
    Ok,
    ReservationClose,
    ReservationOpen,
)
from schemas.topics import Topics
from worker.errors import WorkerError
from worker.executors.base import (
    Executor,
    ExecutorError,
    ExitResult,
    Limits,
    SessionHandle,
    SessionSpec,
    TaskHandle,
    TaskSpec,
)
from worker.output import CHUNK_BYTES, LINGER_S, LogsView, OutputStreamer
from worker.sessions import SessionRecord, SessionStore, remove_tree

log = logging.getLogger(__name__)

LANE = Lane.EXEC
PIN_FILE = "coord_pubkey"
MAX_RUNNING_PER_SESSION = 64
KEEP_EXITED_PER_SESSION = 100  # exited commands kept for exec.list / exec.logs
KEEP_CLOSED = 1024  # closed reservation ids remembered (a late reservation.open is refused)
LIST_COMMAND_CHARS = 1024
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SIGNALS = {"INT", "TERM", "KILL", "HUP", "QUIT", "USR1", "USR2"}


@dataclass
class _Exec:
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
    done: threading.Event = field(default_factory=threading.Event)

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


@dataclass
class _Session:
    record: SessionRecord
    handle: SessionHandle
    execs: dict[str, _Exec] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    closing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def rid(self) -> str:
        return self.record.rid

    def running(self) -> list[_Exec]:
        return [e for e in self.execs.values() if e.exit is None]


class ExecService:
    """Reservations and remote commands of one worker (see the module docstring).

    The caller owns ``bus`` and ``executor``: call ``close()`` before stopping the bus
    (so the last exits and reports still go out), then close the executor.
    """

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        wid: str,
        worker_config: WorkerConfig,
        executor: Executor,
        state_dir: Path | str,
        report_to_coordinator: bool = True,
        *,
        kill_grace_s: float = 5.0,
        chunk_bytes: int = CHUNK_BYTES,
        linger_s: float = LINGER_S,
    ) -> None:
        self.bus = bus
        self.topics = topics
        self.wid = wid
        self.config = worker_config
        self.executor = executor
        self.state_dir = Path(state_dir)
        self.report_to_coordinator = report_to_coordinator
        self.kill_grace_s = kill_grace_s
        self.chunk_bytes = chunk_bytes
        self.linger_s = linger_s
        self.coordinator = worker_config.coordinator_principal or "coordinator"
        self.store = SessionStore(self.state_dir)
        self.key_ready = threading.Event()
        self._key: Ed25519PublicKey | None = None
        self._key_raw: bytes | None = None
        self._pin_broken = False
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._closed: OrderedDict[str, float] = OrderedDict()
        self._threads: list[threading.Thread] = []
        self._registered = False
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------

    def register(self) -> None:
        """Recover sessions from the state dir, load the key, put the handlers on the bus.

        Raises WorkerError when ``coord_pubkey`` is configured but unusable.
        """
        if self._registered:
            return
        self._registered = True
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._recover()
        self._init_key()
        for message_type, handler in (
            (ReservationOpen.TYPE, self._on_open),
            (ReservationClose.TYPE, self._on_close),
            (ExecStart.TYPE, self._on_start),
            (ExecSignal.TYPE, self._on_signal),
            (ExecList.TYPE, self._on_list),
            (ExecLogs.TYPE, self._on_logs),
        ):
            self.bus.on_inbox(message_type, handler, lane=LANE)

    def running(self) -> tuple[list[dict[str, str]], int]:
        """For the heartbeat: open reservations and running commands, and free slots.

        A reservation holds a slot (the coordinator gives a worker one holder at a time).
        """
        with self._lock:
            items: list[dict[str, str]] = []
            for session in self._sessions.values():
                items.append({"kind": "reservation", "id": session.rid})
                items.extend({"kind": "exec", "id": e.exec_id} for e in session.running())
            free = max(0, int(self.config.slots) - len(self._sessions))
        return items, free

    def close(self) -> None:
        """Stop every running command (TERM, KILL after the grace); sessions stay on disk.

        A restarted worker recovers them; the coordinator closes them when their
        reservations end.
        """
        with self._lock:
            self._stopping = True
            execs = [e for s in self._sessions.values() for e in s.running()]
        for ex in execs:
            ex.stop_reason = ex.stop_reason or "the worker is stopping"
            self._signal_quietly(ex.handle, _signal.SIGTERM)
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
        for thread in list(self._threads):
            thread.join(self.kill_grace_s + 5.0)

    # -- recovery and the coordinator's key -----------------------------------------

    def _recover(self) -> None:
        """Re-open the sessions a previous run left on disk; clean what cannot be used."""
        records, junk = self.store.load_all()
        for path in junk:
            log.warning("removing session dir without a usable record: %s", path)
            remove_tree(path)
        handles: dict[str, SessionHandle] = {}
        for record in records:
            try:
                if record.handle:
                    handles[record.rid] = SessionHandle(**record.handle)
            except TypeError as err:
                log.warning("session %s: unreadable handle (%s)", record.rid, err)
        try:
            self.executor.cleanup_orphans(set(handles))
            usable = {h.session_id: h for h in self.executor.recover(list(handles.values()))}
        except ExecutorError as err:
            log.error("cannot recover sessions: %s", err)
            usable = {}
        for record in records:
            handle = handles.get(record.rid)
            if record.rid in usable and record.worker == self.wid:
                self._sessions[record.rid] = _Session(record, usable[record.rid])
                log.info("recovered session of reservation %s (client %s)", record.rid,
                         record.client)
                continue
            log.warning("cleaning session of reservation %s: it cannot be recovered",
                        record.rid)
            if handle is not None and handle.executor == self.executor.name:
                try:
                    self.executor.close_session(handle)
                except ExecutorError as err:
                    log.warning("cannot close session %s: %s", record.rid, err)
            self.store.remove(record.rid)

    def _init_key(self) -> None:
        if self.config.coord_pubkey:
            try:
                key = public_key_from_text(self.config.coord_pubkey.strip())
            except GrantError as err:
                raise WorkerError(f"worker.coord_pubkey is not usable: {err}") from err
            self._set_key(key)
            log.info("grants are checked with the configured coordinator key")
            return
        pin = self.state_dir / PIN_FILE
        if pin.exists():
            try:
                self._set_key(public_key_from_text(pin.read_text().strip()))
            except (OSError, GrantError) as err:
                self._pin_broken = True
                log.error("pinned coordinator key %s is unusable (%s): every grant is refused "
                          "until it is fixed or removed", pin, err)
        self.bus.subscribe(self.topics.coord_pubkey, self._on_pubkey, lane=LANE)

    def _set_key(self, key: Ed25519PublicKey) -> None:
        self._key = key
        self._key_raw = public_key_bytes(key)
        self.key_ready.set()

    def _on_pubkey(self, incoming: Incoming) -> None:
        body = incoming.body
        if not isinstance(body, CoordPubkey):
            return
        if body.alg != "ed25519":
            log.error("coordinator key with unsupported algorithm %r ignored", body.alg)
            return
        try:
            key = public_key_from_text(body.key)
        except GrantError as err:
            log.error("coordinator key on %s ignored: %s", incoming.topic, err)
            return
        raw = public_key_bytes(key)
        with self._lock:
            if self._pin_broken:
                return
            if self._key_raw is None:
                self._pin(body.key)
                self._set_key(key)
                log.info("pinned the coordinator's grant key (kid %s)", body.kid or "?")
            elif raw != self._key_raw:
                log.error(
                    "the coordinator now publishes a different grant key (kid %s): refused, "
                    "grants are still checked with the pinned key. If the coordinator's key "
                    "really changed, remove %s and restart the worker.",
                    body.kid or "?", self.state_dir / PIN_FILE)

    def _pin(self, text: str) -> None:
        path = self.state_dir / PIN_FILE
        tmp = path.with_name(f".{PIN_FILE}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text.strip() + "\n")
            os.replace(tmp, path)
        except OSError as err:
            log.error("cannot pin the coordinator key in %s: %s", path, err)

    # -- reservations ------------------------------------------------------------------

    def _from_coordinator(self, incoming: Incoming) -> bool:
        if incoming.sender == self.coordinator:
            return True
        log.warning("%s from %s refused: only %s may send it", incoming.message.type,
                    incoming.sender, self.coordinator)
        self.bus.reply_error(incoming, "forbidden",
                             f"only the coordinator may send {incoming.message.type}",
                             detail={"reason": "not_coordinator"})
        return False

    def _on_open(self, incoming: Incoming) -> None:
        if not self._from_coordinator(incoming):
            return
        body: ReservationOpen = incoming.body
        res = body.reservation
        rid, client, worker = str(res["id"]), str(res["client"]), str(res["worker"])
        if worker != self.wid:
            self.bus.reply_error(incoming, "invalid",
                                 f"reservation {rid} is for worker {worker}, not {self.wid}")
            return
        with self._lock:
            existing = self._sessions.get(rid)
            closed = rid in self._closed
            stopping = self._stopping
        if stopping:
            self.bus.reply_error(incoming, "unavailable", f"worker {self.wid} is stopping")
            return
        if existing is not None:
            if existing.closing:
                self.bus.reply_error(incoming, "conflict", f"reservation {rid} is closing")
            elif existing.record.client != client:
                self.bus.reply_error(incoming, "conflict",
                                     f"reservation {rid} is open here for another client")
            else:
                self.bus.reply(incoming, Ok(detail={"reservation": rid, "existing": True}))
            return
        if closed:
            self.bus.reply_error(incoming, "conflict", f"reservation {rid} was closed")
            return
        limits = dict(body.limits or {})
        spec = SessionSpec(
            session_id=rid, workdir=self.store.prepare(rid), owner=client,
            limits=Limits(cpus=limits.get("cpus"), memory_bytes=limits.get("memory_bytes"),
                          pids=limits.get("pids")),
            image=res.get("image"),
        )
        try:
            handle = self.executor.open_session(spec)
        except ExecutorError as err:
            log.error("cannot open session of reservation %s: %s", rid, err)
            self.store.remove(rid)
            self.bus.reply_error(incoming, "unavailable", f"cannot prepare the session: {err}")
            return
        record = SessionRecord(rid=rid, client=client, worker=worker, reservation=dict(res),
                               limits=limits, handle=handle.to_dict())
        try:
            self.store.save(record)
        except OSError as err:
            log.error("cannot persist session %s: %s", rid, err)
            self._close_quietly(handle)
            self.store.remove(rid)
            self.bus.reply_error(incoming, "internal", f"cannot persist the session: {err}")
            return
        with self._lock:
            self._sessions[rid] = _Session(record, handle)
        log.info("opened session of reservation %s for %s", rid, client)
        self.bus.reply(incoming, Ok(detail={"reservation": rid}))

    def _on_close(self, incoming: Incoming) -> None:
        if not self._from_coordinator(incoming):
            return
        body: ReservationClose = incoming.body
        rid = body.reservation
        with self._lock:
            session = self._sessions.get(rid)
        if session is None:
            self.bus.reply(incoming, Ok(detail={"reservation": rid, "known": False}))
            return
        with session.lock:
            already = session.closing
            session.closing = True
        if already:
            self.bus.reply(incoming, Ok(detail={"reservation": rid, "closing": True}))
            return
        reason = body.reason or "the reservation ended"

        def run() -> None:
            self._close_session(session, reason)
            self.bus.reply(incoming, Ok(detail={"reservation": rid}))

        self._spawn(run, f"close-{rid}")

    def _close_session(self, session: _Session, reason: str) -> None:
        """Stop the session's commands, let their exits and reports go out, remove it."""
        execs = session.running()
        for ex in execs:
            ex.stop_reason = f"reservation closed: {reason}"
        log.info("closing session of reservation %s (%s); stopping %d command(s)",
                 session.rid, reason, len(execs))
        self._close_quietly(session.handle)
        for ex in execs:
            if not ex.done.wait(self.kill_grace_s + 10.0):
                ex.streamer.abort()
        self.store.remove(session.rid)
        with self._lock:
            self._sessions.pop(session.rid, None)
            self._closed[session.rid] = time.time()
            while len(self._closed) > KEEP_CLOSED:
                self._closed.popitem(last=False)

    def _close_quietly(self, handle: SessionHandle) -> None:
        try:
            self.executor.close_session(handle)
        except Exception:
            log.exception("closing session %s failed", handle.session_id)

    # -- grants ------------------------------------------------------------------------

    def _authorize(self, incoming: Incoming, grant: str) -> tuple[GrantClaims, _Session] | None:
        """The grant's claims and open session, or None after replying ``forbidden``."""

        def refuse(reason: str, message: str) -> None:
            log.warning("%s from %s refused (%s): %s", incoming.message.type,
                        incoming.sender, reason, message)
            self.bus.reply_error(incoming, "forbidden", message, detail={"reason": reason})

        sender = incoming.sender
        if not sender:
            refuse("no_sender", "the request did not come through an inbox")
            return None
        key = self._key
        if key is None:
            refuse("no_key", f"worker {self.wid} does not know the coordinator's key yet")
            return None
        try:
            claims = verify_grant(key, grant, client=sender, worker=self.wid)
        except GrantError as err:
            refuse(err.code, f"grant refused: {err}")
            return None
        with self._lock:
            session = self._sessions.get(claims.rid)
        if session is None or session.closing:
            refuse("reservation_not_open",
                   f"reservation {claims.rid} is not open on worker {self.wid}")
            return None
        if session.record.client != claims.client:
            refuse("wrong_client", f"reservation {claims.rid} is not held by {claims.client}")
            return None
        return claims, session

    # -- commands ----------------------------------------------------------------------

    def _on_start(self, incoming: Incoming) -> None:
        body: ExecStart = incoming.body
        auth = self._authorize(incoming, body.grant)
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
        if body.stdin:
            self.bus.reply_error(incoming, "unsupported", "commands get no stdin")
            return
        timeout = _timeout(body.timeout_s, self.config.exec_timeout_s)
        launched = self._launch(session, body, client, env, timeout)
        if not isinstance(launched, _Exec):
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
            ex.streamer.start()
            self._spawn(lambda: self._supervise(ex), f"exec-{ex.exec_id}-supervise")

    def _launch(self, session: _Session, body: ExecStart, client: str, env: dict[str, str],
                timeout: float | None) -> _Exec | tuple[str, str]:
        """Start the command under the session's lock (a close cannot slip in between);
        returns the exec, or (error code, message)."""
        streamer = OutputStreamer(
            body.exec_id, self.bus.send, send_bytes=self._send_bytes,
            max_bytes=_output_cap(body.max_output_bytes, self.config.max_output_bytes),
            ring_bytes=self.config.log_ring_bytes,
            chunk_bytes=self.chunk_bytes, linger_s=self.linger_s,
        )
        if body.mode == "output":
            streamer.add_target(self.topics.client_inbox(client))
        with session.lock:
            if self._stopping:
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
                            session=session.handle, env=env, timeout_s=timeout)
            try:
                handle = self.executor.start(spec, streamer.feed)
            except ExecutorError as err:
                return "internal", f"cannot start the command: {err}"
            ex = _Exec(exec_id=body.exec_id, rid=session.rid, client=client,
                       command=body.command, mode=body.mode, handle=handle,
                       streamer=streamer, timeout_s=timeout,
                       started_at=handle.started_at or time.time())
            session.used.add(body.exec_id)
            session.execs[body.exec_id] = ex
            self._prune(session)
        return ex

    def _supervise(self, ex: _Exec) -> None:
        """Wait for the command (killing it at its timeout), send exec.exit, report."""
        timed_out = False
        try:
            result = self.executor.wait(ex.handle, ex.timeout_s)
            if result is None:
                timed_out = True
                log.info("exec %s timed out after %ss; stopping it", ex.exec_id, ex.timeout_s)
                result = self.executor.stop(ex.handle, self.kill_grace_s)
            if result is None:
                result = ExitResult(exit_code=None, error="the command did not stop")
        except Exception as err:
            log.exception("supervising exec %s failed", ex.exec_id)
            result = ExitResult(exit_code=None, error=f"internal error: {err}")
        streamer = ex.streamer
        streamer.close_input()
        error = result.error or ex.stop_reason
        exit_body = ExecExit(  # the streamer fills in last_seq, truncated, output_bytes
            exec_id=ex.exec_id, last_seq=-1,
            duration_s=max(0.0, float(result.duration_s)),
            exit_code=result.exit_code, signal=result.signal,
            timed_out=timed_out or result.timed_out, truncated=False,
            oom_killed=result.oom_killed, error=error[:4096] if error else None,
            output_bytes=0,
        )
        with self._lock:
            ex.exit = exit_body  # exited, as far as exec.list is concerned
        streamer.finish(exit_body)
        streamer.join()  # long only while the broker does not acknowledge our output
        exit_body = streamer.exit or exit_body
        with self._lock:
            ex.exit = exit_body
        log.info("exec %s in %s ended: exit %s signal %s%s", ex.exec_id, ex.rid,
                 exit_body.exit_code, exit_body.signal, " (timed out)" if timed_out else "")
        if self.report_to_coordinator:
            self._report(ex, exit_body)
        ex.done.set()

    def _report(self, ex: _Exec, exit_body: ExecExit) -> None:
        report = ExecReport(
            reservation=ex.rid, client=ex.client, exec_id=ex.exec_id, command=ex.command,
            started_at=ex.started_at, mode=ex.mode, exit_code=exit_body.exit_code,
            signal=exit_body.signal, duration_s=exit_body.duration_s,
            timed_out=exit_body.timed_out, truncated=exit_body.truncated,
            oom_killed=exit_body.oom_killed, error=exit_body.error,
            output_bytes=exit_body.output_bytes,
        )
        try:
            self.bus.send(self.topics.coord_inbox, report)
        except Exception:
            log.exception("cannot report exec %s to the coordinator", ex.exec_id)

    def _authorized_exec(self, incoming: Incoming, grant: str, exec_id: str) -> _Exec | None:
        """The exec a request names, if the grant holds; else the error is already sent."""
        auth = self._authorize(incoming, grant)
        if auth is None:
            return None
        ex = auth[1].execs.get(exec_id)
        if ex is None:
            self.bus.reply_error(incoming, "not_found",
                                 f"no exec {exec_id} in this reservation")
        return ex

    def _on_signal(self, incoming: Incoming) -> None:
        body: ExecSignal = incoming.body
        ex = self._authorized_exec(incoming, body.grant, body.exec_id)
        if ex is None:
            return
        if body.signal not in _SIGNALS:
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

    def _on_list(self, incoming: Incoming) -> None:
        body: ExecList = incoming.body
        auth = self._authorize(incoming, body.grant)
        if auth is None:
            return
        session = auth[1]
        with session.lock:
            execs = [e.summary() for e in session.execs.values()]
        self.bus.reply(incoming, ExecListReply(execs=execs))

    def _on_logs(self, incoming: Incoming) -> None:
        body: ExecLogs = incoming.body
        ex = self._authorized_exec(incoming, body.grant, body.exec_id)
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

    # -- helpers -----------------------------------------------------------------------

    def _prune(self, session: _Session) -> None:
        """Forget the oldest exited commands beyond the keep limit (ids stay used)."""
        exited = [e.exec_id for e in session.execs.values() if e.exit is not None]
        for exec_id in exited[: max(0, len(exited) - KEEP_EXITED_PER_SESSION)]:
            del session.execs[exec_id]

    def _send_bytes(self, base_inbox: str, payload: bytes) -> Any:
        """Publish pre-encoded output into an inbox under our id (like ``Bus.send``)."""
        topic = self.topics.inbox_for(base_inbox, self.bus.principal)
        return self.bus.publish_bytes(topic, payload, qos=1)

    def _signal_quietly(self, handle: TaskHandle, signum: int) -> None:
        try:
            self.executor.signal(handle, signum)
        except ExecutorError as err:
            log.debug("signal %d to %s: %s", signum, handle.task_id, err)

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()


def _timeout(requested: float | None, worker_max: float) -> float | None:
    """The requested timeout capped by the worker's; None = no timeout (0 = none)."""
    values = [float(v) for v in (requested, worker_max) if v and v > 0]
    return min(values) if values else None


def _output_cap(requested: int | None, worker_max: int) -> int:
    """The requested output cap (0 allowed) capped by the worker's (0 = no cap)."""
    values = [int(v) for v in (requested,) if v is not None]
    values += [int(worker_max)] if worker_max and worker_max > 0 else []
    return min(values) if values else 2**62

