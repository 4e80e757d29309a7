"""ExecService: the worker side of reservations and remote commands (docs/protocol.md).

It owns the protocol; the executor only runs things. On the worker's inbox it handles

- ``reservation.open`` / ``reservation.close`` from the coordinator principal only:
  open (and persist) or close (stop commands, remove the work dir) a session
  (worker/exec_sessions.py);
- ``exec.start`` (worker/exec_commands.py) and ``exec.signal`` / ``exec.list`` /
  ``exec.logs`` / ``exec.stdin`` (worker/exec_requests.py) from clients, each under a
  grant checked by worker/exec_auth.py: it must verify with the coordinator's key, name
  this worker and the *sending* principal, be unexpired, and belong to a session open
  here. Otherwise the answer is ``forbidden`` (``detail.reason`` = why) and nothing runs
  (invariant 2).

Every handler sits behind the worker's request guard (worker/request_guard.py: the role
table and per-principal rate limits), and every ``exec.report`` goes through the report
outbox (worker/exec_reports.py: kept on disk and re-sent until the coordinator has
committed it). Handlers run on one bus lane and only do quick work; each command gets a supervisor
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
from schemas.exec_messages import ExecResize, ExecStdin
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
from worker.exec_reports import ReportOutbox
from worker.exec_requests import ExecRequests
from worker.exec_sessions import Session, SessionTable
from worker.executors.base import Executor
from worker.output import CHUNK_BYTES, LINGER_S
from worker.request_guard import WorkerRequestGuard
from worker.sessions import SessionStore
from worker.thread_reuse import ThreadReuse

log = logging.getLogger(__name__)

LANE = Lane.EXEC
MAX_RUNNING_ITEMS = 256  # schemas/json/worker.heartbeat.json caps `running` at this
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
        guard: WorkerRequestGuard | None = None,
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
        # Each running command's output streamer (it waits for PUBACKs) on a reused
        # thread: a Thread.start() per command cost a scheduler round trip under load.
        self._streamers = ThreadReuse("exec-out")
        self._registered = False
        self._stopping = threading.Event()
        self.key = CoordinatorKey(bus, topics, worker_config, self.state_dir, LANE)
        self.sessions = SessionTable(
            bus, wid, worker_config.coordinator_principal or "coordinator", executor,
            self.store, stopping=self._stopping, spawn=self._spawn,
            kill_grace_s=kill_grace_s)
        self.authorizer = ExecAuthorizer(bus, wid, self.key, self.sessions.get)
        coordinator = worker_config.coordinator_principal or "coordinator"
        self.reports = (ReportOutbox(bus, topics, self.state_dir, coordinator=coordinator)
                        if report_to_coordinator else None)
        self.commands = CommandRunner(
            bus, topics, wid, worker_config, executor, self.authorizer,
            stopping=self._stopping, spawn=self._spawn, kill_grace_s=kill_grace_s,
            chunk_bytes=chunk_bytes, linger_s=linger_s,
            send_report=self.reports.add if self.reports is not None else None,
            run_streamer=self._streamers.run)
        self.requests = ExecRequests(bus, topics, executor, self.authorizer)
        self.guard = guard or WorkerRequestGuard(bus, worker_config)

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
        if self.reports is not None:
            self.reports.start()
        for message_type, handler in (
            (ReservationOpen.TYPE, self.sessions.on_open),
            (ReservationClose.TYPE, self.sessions.on_close),
            (ExecStart.TYPE, self.commands.on_start),
            (ExecSignal.TYPE, self.requests.on_signal),
            (ExecList.TYPE, self.requests.on_list),
            (ExecLogs.TYPE, self.requests.on_logs),
            (ExecStdin.TYPE, self.requests.on_stdin),
            (ExecResize.TYPE, self.requests.on_resize),
        ):
            self.bus.on_inbox(message_type, self.guard.wrap(handler), lane=LANE)

    def running(self) -> tuple[list[dict[str, str]], int]:
        """For the heartbeat: open reservations and running commands, and free slots.

        A reservation holds a slot (the coordinator gives a worker one holder at a time).
        At most ``MAX_RUNNING_ITEMS`` (the schema's cap), sessions first: the coordinator
        reconciles sessions; commands are for people reading the heartbeat.
        """
        sessions = self.sessions.all()
        items: list[dict[str, str]] = [{"kind": "reservation", "id": s.rid} for s in sessions]
        for session in sessions:
            items.extend({"kind": "exec", "id": e.exec_id} for e in session.running())
        free = max(0, int(self.config.slots) - len(sessions))
        return items[:MAX_RUNNING_ITEMS], free

    def close(self) -> None:
        """Stop every running command (TERM, KILL after the grace), then close every
        session (work dirs and containers go): a worker that stops cleanly goes offline,
        which ends its reservations. (A killed worker's sessions stay on disk: when it
        restarts it recovers them, and the coordinator closes those that ended.)
        """
        self._stopping.set()
        execs = [e for s in self.sessions.all() for e in s.running()]
        self.commands.stop_all(execs, "the worker is stopping")
        self.sessions.close_all("the worker is stopping")
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(self.kill_grace_s + 5.0)
        self._streamers.close()  # every command has ended: its streamer has too
        if self.reports is not None:
            self.reports.close()  # unacknowledged reports stay on disk for the next run

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self._lock:  # started before it is listed: close() joins only started ones
            self._threads = [t for t in self._threads if t.is_alive()]
            thread.start()
            self._threads.append(thread)
