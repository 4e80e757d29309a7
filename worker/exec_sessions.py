"""The sessions of a worker's exec service: one per reservation open here.

The coordinator opens a session with ``reservation.open`` (the executor prepares it and
the record is persisted, see worker/sessions.py) and ends it with
``reservation.close`` (its commands are stopped, their exits and reports go out, the
session directory is removed). A worker that stops cleanly closes all its sessions
(``close_all``): going offline ends their reservations. A worker that was killed
recovers, when it restarts, the sessions its executor can still use and cleans up the
rest, including handles it cannot read (a previous layout, another driver, an unknown
version); the coordinator closes those whose reservations ended meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.bus import Bus, Incoming
from schemas.messages import Ok, ReservationClose, ReservationOpen
from worker.exec_auth import from_coordinator
from worker.executors.base import (
    Executor,
    ExecutorError,
    HandleError,
    Limits,
    SessionHandle,
    SessionSpec,
)
from worker.sessions import SessionRecord, SessionStore, remove_tree

if TYPE_CHECKING:
    from worker.exec_commands import Command

log = logging.getLogger(__name__)

KEEP_CLOSED = 1024  # closed reservation ids remembered (a late reservation.open is refused)

Spawn = Callable[[Callable[[], None], str], None]
"""Runs a callable in a thread of the service's (joined when the service closes)."""


@dataclass
class Session:
    record: SessionRecord
    handle: SessionHandle
    execs: dict[str, Command] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)  # exec ids, never reused
    closing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def rid(self) -> str:
        return self.record.rid

    def running(self) -> list[Command]:
        return [e for e in self.execs.values() if e.exit is None]


class SessionTable:
    """The open sessions, and the handlers that open and close them (coordinator only).

    ``stopping`` is set when the service stops (no new sessions); ``spawn`` runs a close
    off the bus lane.
    """

    def __init__(self, bus: Bus, wid: str, coordinator: str, executor: Executor,
                 store: SessionStore, *, stopping: threading.Event, spawn: Spawn,
                 kill_grace_s: float) -> None:
        self.bus = bus
        self.wid = wid
        self.coordinator = coordinator
        self.executor = executor
        self.store = store
        self.stopping = stopping
        self.spawn = spawn
        self.kill_grace_s = kill_grace_s
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._closed: OrderedDict[str, float] = OrderedDict()

    def get(self, rid: str) -> Session | None:
        with self._lock:
            return self._sessions.get(rid)

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    # -- recovery ----------------------------------------------------------------------

    def recover(self) -> None:
        """Re-open the sessions a previous run left on disk; clean what cannot be used."""
        records, junk = self.store.load_all()
        for path in junk:
            log.warning("removing session dir without a usable record: %s", path)
            remove_tree(path)
        handles: dict[str, SessionHandle] = {}
        for record in records:
            if not record.handle:
                continue
            try:
                handle = SessionHandle.from_dict(record.handle)
                if handle.session_id != record.rid:
                    raise HandleError(f"handle names session {handle.session_id!r}")
            except HandleError as err:
                log.warning("session %s: unreadable handle (%s)", record.rid, err)
                continue
            handles[record.rid] = handle
        try:
            self.executor.cleanup_orphans(set(handles))
            usable = {h.session_id: h for h in self.executor.recover(list(handles.values()))}
        except ExecutorError as err:
            log.error("cannot recover sessions: %s", err)
            usable = {}
        for record in records:
            known = handles.get(record.rid)
            if record.rid in usable and record.worker == self.wid:
                with self._lock:
                    self._sessions[record.rid] = Session(record, usable[record.rid])
                log.info("recovered session of reservation %s (client %s)", record.rid,
                         record.client)
                continue
            log.warning("cleaning session of reservation %s: it cannot be recovered",
                        record.rid)
            if known is not None and known.executor == self.executor.name:
                self._close_quietly(known)
            self.store.remove(record.rid)

    # -- handlers ----------------------------------------------------------------------

    def on_open(self, incoming: Incoming) -> None:
        if not from_coordinator(self.bus, self.coordinator, incoming):
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
        if self.stopping.is_set():
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
        spec = SessionSpec(session_id=rid, workdir=self.store.prepare(rid), owner=client,
                           limits=Limits.from_dict(limits), image=res.get("image"))
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
            self._sessions[rid] = Session(record, handle)
        log.info("opened session of reservation %s for %s", rid, client)
        self.bus.reply(incoming, Ok(detail={"reservation": rid}))

    def on_close(self, incoming: Incoming) -> None:
        if not from_coordinator(self.bus, self.coordinator, incoming):
            return
        body: ReservationClose = incoming.body
        rid = body.reservation
        session = self.get(rid)
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
            self.close(session, reason)
            self.bus.reply(incoming, Ok(detail={"reservation": rid}))

        self.spawn(run, f"close-{rid}")

    def close(self, session: Session, reason: str) -> None:
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

    def close_all(self, reason: str) -> None:
        """Close every open session (a clean worker stop: the coordinator ends their
        reservations when the worker goes offline, and nobody would remove what they
        hold, docker containers included, until this worker runs again)."""
        for session in self.all():
            with session.lock:
                already = session.closing
                session.closing = True
            if not already:
                self.close(session, reason)

    def _close_quietly(self, handle: SessionHandle) -> None:
        try:
            self.executor.close_session(handle)
        except Exception:
            log.exception("closing session %s failed", handle.session_id)
