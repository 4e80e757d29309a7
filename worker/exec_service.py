"""ExecService: the worker side of reservations and remote commands (docs/protocol.md).

It owns the protocol; the executor only runs things. On the worker's inbox it handles

- ``reservation.open`` / ``reservation.close`` from the coordinator principal only:
  open (and persist) or close (stop commands, remove the work dir) a session
  (worker/exec_sessions.py);
- ``exec.start`` (worker/exec_commands.py) and ``exec.signal`` / ``exec.list`` /
  ``exec.logs`` (worker/exec_requests.py) from clients, each under a grant checked by
  worker/exec_auth.py: it must verify with the coordinator's key, name this worker and
  the *sending* principal, be unexpired, and belong to a session open here. Otherwise
  the answer is ``forbidden`` (``detail.reason`` = why) and nothing runs (invariant 2).

Handlers run on one bus lane and only do quick work; each command gets a supervisor
thread (wait, timeout, exit, report) and an output streamer thread (worker.output), and
closing a reservation runs in a thread of its own, so a slow stop never blocks the lane.
This module wires the parts together and owns their lifecycle.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from broker.bus import Bus, Lane
from broker.config import WorkerConfig
from schemas.messages import (
    ExecList,
    ExecLogs,
    ExecSignal,
    ExecStart,
    ReservationClose,
    ReservationOpen,
)
from schemas.topics import Topics
from worker.exec_auth import PIN_FILE, CoordinatorKey, ExecAuthorizer
from worker.exec_commands import CommandRunner
from worker.exec_requests import ExecRequests
from worker.exec_sessions import Session, SessionTable
from worker.executors.base import Executor
from worker.output import CHUNK_BYTES, LINGER_S
from worker.sessions import SessionStore

log = logging.getLogger(__name__)

LANE = Lane.EXEC
__all__ = ["LANE", "PIN_FILE", "ExecService"]


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
        self.kill_grace_s = kill_grace_s
        self.store = SessionStore(self.state_dir)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._registered = False
        self._stopping = threading.Event()
        self.key = CoordinatorKey(bus, topics, worker_config, self.state_dir, LANE)
        self.sessions = SessionTable(
            bus, wid, worker_config.coordinator_principal or "coordinator", executor,
            self.store, stopping=self._stopping, spawn=self._spawn,
            kill_grace_s=kill_grace_s)
        self.authorizer = ExecAuthorizer(bus, wid, self.key, self.sessions.get)
        self.commands = CommandRunner(
            bus, topics, wid, worker_config, executor, self.authorizer,
            stopping=self._stopping, spawn=self._spawn, kill_grace_s=kill_grace_s,
            chunk_bytes=chunk_bytes, linger_s=linger_s,
            report_to_coordinator=report_to_coordinator)
        self.requests = ExecRequests(bus, topics, executor, self.authorizer)

    @property
    def key_ready(self) -> threading.Event:
        """Set once the coordinator's key is known (configured, pinned or received)."""
        return self.key.ready

    def session(self, rid: str) -> Session | None:
        """The open session of reservation ``rid``."""
        return self.sessions.get(rid)

    # -- lifecycle -------------------------------------------------------------------

    def register(self) -> None:
        """Recover sessions from the state dir, load the key, put the handlers on the bus.

        Raises WorkerError when ``coord_pubkey`` is configured but unusable.
        """
        if self._registered:
            return
        self._registered = True
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.sessions.recover()
        self.key.load()
        for message_type, handler in (
            (ReservationOpen.TYPE, self.sessions.on_open),
            (ReservationClose.TYPE, self.sessions.on_close),
            (ExecStart.TYPE, self.commands.on_start),
            (ExecSignal.TYPE, self.requests.on_signal),
            (ExecList.TYPE, self.requests.on_list),
            (ExecLogs.TYPE, self.requests.on_logs),
        ):
            self.bus.on_inbox(message_type, handler, lane=LANE)

    def running(self) -> tuple[list[dict[str, str]], int]:
        """For the heartbeat: open reservations and running commands, and free slots.

        A reservation holds a slot (the coordinator gives a worker one holder at a time).
        """
        sessions = self.sessions.all()
        items: list[dict[str, str]] = []
        for session in sessions:
            items.append({"kind": "reservation", "id": session.rid})
            items.extend({"kind": "exec", "id": e.exec_id} for e in session.running())
        free = max(0, int(self.config.slots) - len(sessions))
        return items, free

    def close(self) -> None:
        """Stop every running command (TERM, KILL after the grace); sessions stay on disk.

        A restarted worker recovers them; the coordinator closes them when their
        reservations end.
        """
        self._stopping.set()
        execs = [e for s in self.sessions.all() for e in s.running()]
        self.commands.stop_all(execs, "the worker is stopping")
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(self.kill_grace_s + 5.0)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
