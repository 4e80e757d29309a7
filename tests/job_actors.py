"""Hand-driven actors for the coordinator's batch-job tests (tests/test_jobs_coordinator.py).

- :class:`JobWorker`: a :class:`FakeWorker` that also answers ``job.assign`` as the test
  wants (``assign_mode``: ok, error, silent; ``auto``: start and report success by
  itself), records ``job.kill``, and sends ``attempt.started`` / ``attempt.report`` and
  heartbeats listing attempts.
- :class:`JobClient`: a client principal with an inbox that records ``job.event``.
- :func:`start_jobs_coordinator`: the grid's coordinator with ``[jobs]`` settings.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from broker.bus import BusError, Incoming, RequestTimeout
from schemas.job_messages import (
    AttemptReport,
    AttemptStarted,
    JobAssign,
    JobEvent,
    JobKill,
    JobsSubmit,
    JobsSubmitted,
)
from schemas.messages import Body, Ok
from tests.fixtures.actors import FakeWorker
from tests.fixtures.grid import COORDINATOR
from tests.fixtures.services import wait_for

if TYPE_CHECKING:
    from coordinator.service import Coordinator
    from tests.fixtures.grid import GridHarness


def start_jobs_coordinator(grid: GridHarness, **jobs: Any) -> Coordinator:
    """``GridHarness.start_coordinator`` with ``[jobs]`` settings (``assign_ack_s=1``)."""
    from coordinator.service import Coordinator

    config = grid.config_for(COORDINATOR, "coordinator")
    for key, value in grid.coordinator_settings.items():
        setattr(config.coordinator, key, value)
    config.jobs.pass_s = 0.2
    for key, value in jobs.items():
        if not hasattr(config.jobs, key):
            raise TypeError(f"no jobs setting {key!r}")
        setattr(config.jobs, key, value)
    watcher = grid.watcher
    coordinator = Coordinator(config, grid.store)
    grid.coordinator = coordinator
    coordinator.start()
    watcher.wait_coordinator_up(coordinator.started_at)
    return coordinator


class JobWorker(FakeWorker):
    """See the module docstring."""

    def __init__(self, harness: GridHarness, wid: str) -> None:
        super().__init__(harness, wid)
        self.assign_mode = "ok"
        self.auto = False
        self.exit_code = 0
        self.assigns: list[JobAssign] = []
        self.kills: list[JobKill] = []
        self.bus.on_inbox("job.assign", self._on_assign)
        self.bus.on_inbox("job.kill", self._on_kill)

    def _on_assign(self, incoming: Incoming) -> None:
        body: JobAssign = incoming.body
        with self._lock:
            self.assigns.append(body)
        if self.assign_mode == "ok":
            self.bus.reply(incoming, Ok())
        elif self.assign_mode == "error":
            self.bus.reply_error(incoming, "unavailable", "no room")
        if self.auto and self.assign_mode == "ok":
            threading.Thread(target=self._auto_finish, args=(body.attempt,),
                             daemon=True).start()

    def _auto_finish(self, aid: str) -> None:
        """``auto``'s thread: the test may end, and its harness stop this bus, before the
        report is answered; the thread then ends quietly (it raised "bus stopped" into
        whichever test ran next, or re-sent on a stopped bus for ever)."""
        try:
            self._finish(aid)
        except (BusError, RequestTimeout):
            if not self.bus.stopping:
                raise

    def _finish(self, aid: str) -> None:
        self.request(AttemptStarted(attempt=aid), retry=True)
        kind = "success" if self.exit_code == 0 else "exit_nonzero"
        self.request(AttemptReport(attempt=aid, kind=kind, exit_code=self.exit_code,
                                   duration_s=0.01), retry=True)

    def _on_kill(self, incoming: Incoming) -> None:
        with self._lock:
            self.kills.append(incoming.body)
        self.bus.reply(incoming, Ok())

    def assigned(self, count: int = 1, timeout: float = 10.0) -> list[JobAssign]:
        wait_for(lambda: len(self.assigns) >= count, timeout,
                 message=f"{self.wid} got {count} job.assign")
        with self._lock:
            return list(self.assigns)

    def killed(self, aid: str) -> bool:
        with self._lock:
            return any(k.attempt == aid for k in self.kills)

    def request(self, body: Body, *, retry: bool = False) -> Any:
        """Send ``body`` to the coordinator; the reply body (errors returned). ``retry``:
        re-send on timeouts until answered (as the real worker does)."""
        while True:
            try:
                return self.bus.request(self.topics.coord_inbox, body, raise_errors=False,
                                        timeout=5.0).body
            except RequestTimeout:
                if not retry or self.bus.stopping:
                    raise

    def started(self, aid: str) -> Any:
        return self.request(AttemptStarted(attempt=aid))

    def report_attempt(self, aid: str, kind: str = "success", **fields: Any) -> Any:
        return self.request(AttemptReport(attempt=aid, kind=kind, **fields))

    def heartbeat_attempts(self, seq: int, attempts: list[str]) -> None:
        self.heartbeat(seq, attempts=attempts)


class JobClient:
    """A client principal that submits and records its ``job.event``s."""

    def __init__(self, grid: GridHarness, principal: str, role: str = "client") -> None:
        self.principal = principal
        self.topics = grid.topics
        self.events: list[JobEvent] = []
        self._lock = threading.Lock()
        self.bus = grid.bus(principal, role, inbox=grid.topics.client_inbox(principal),
                            start=False)
        self.bus.on_inbox("job.event", self._on_event)
        self.bus.start(timeout=5)

    def _on_event(self, incoming: Incoming) -> None:
        with self._lock:
            self.events.append(incoming.body)

    def request(self, body: Body) -> Any:
        return self.bus.request(self.topics.coord_inbox, body, raise_errors=False).body

    def submit(self, *specs: dict[str, Any]) -> list[str]:
        reply = self.request(JobsSubmit(jobs=list(specs)))
        assert isinstance(reply, JobsSubmitted), reply
        return reply.ids

    def states_of(self, job: str) -> list[str]:
        with self._lock:
            return [e.state for e in self.events if e.job == job]
