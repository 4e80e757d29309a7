"""The Python API: ``Grid`` connects with the same configuration as the CLI.

    with Grid.connect() as grid:
        for w in grid.workers(state=["online"]):
            print(w.name, w.cpus)
        with grid.reserve(any={"min_cpus": 2}) as w:
            print(w.run("uname -a").text)

One ``Grid`` is one client *session*: its bus client id names the session in
``client.hello`` (sent on every (re)connect and whenever a coordinator comes up, followed
by ``client.accepts``: this session handles ``job.events``) and in the connection's last will
``client.gone``, so the coordinator ends the session's reservations when the process
dies, and not while it merely reconnects.

Errors: everything this API raises is a ``client.errors.ClientError`` (bus and codec
errors are translated here, at the boundary). Requests are checked before they are sent
(``client.validation``), and a request to the coordinator fails at once, instead of
after the request timeout, when the coordinator's retained status on the broker says it
is down (``CoordinatorDown``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.bus import Bus, BusError, Incoming, Lane, Will
from broker.config import Config, load_config
from broker.transfer import TransferEndpoint
from client import validation
from client.errors import (
    ClientError,
    CoordinatorDown,
    InvalidRequest,
    NotConfigured,
    Unreachable,
    translated,
)
from client.exec_stream import ExecStream, decode_data
from client.reservation import Refused, ReservedWorker
from schemas.job_messages import JobEvent, JobEvents
from schemas.messages import (
    ClientAccepts,
    ClientGone,
    ClientHello,
    CoordStatus,
    Error,
    ExecExit,
    ExecOutput,
    Ping,
    Pong,
    Renew,
    ReservationEnded,
    ReservationsList,
    ReservationsListReply,
    Reserve,
    ReserveReply,
    WorkersDrain,
    WorkersForget,
    WorkersList,
    WorkersListReply,
    WorkersShow,
    WorkersShowReply,
)
from schemas.topics import Topics

if TYPE_CHECKING:
    from collections.abc import Sequence

    from client.apps import AppStore
    from client.data import DataStore
    from client.jobs import JobExecutor, JobFuture, JobStore

log = logging.getLogger(__name__)

# The coordinator waits up to 10 s for the worker to open a reservation: wait longer.
RESERVE_EXTRA_TIMEOUT_S = 12.0
# While waiting for a reply, how often to look whether the coordinator went down.
DOWN_CHECK_S = 0.1
# ``reserve(wait=...)``: the first retry after this, then ever slower up to the maximum.
WAIT_FIRST_RETRY_S = 0.5
WAIT_MAX_RETRY_S = 3.0
# Refusals that a free worker may lift: worth retrying while ``wait`` lasts.
WAITABLE = frozenset({"conflict", "unavailable", "rate_limited"})


@dataclass(frozen=True)
class CoordinatorState:
    """The coordinator's retained ``coord.status`` as this session last saw it."""

    up: bool
    clean: bool | None
    since: float | None  # when it went down or came up, when known

    def describe(self) -> str:
        when = ""
        if self.since is not None:
            fmt = "%H:%M:%S" if time.time() - self.since < 86400 else "%Y-%m-%d %H:%M:%S"
            when = f" since {time.strftime(fmt, time.localtime(self.since))}"
        how = "stopped" if self.clean else "its connection to the broker was lost"
        return (f"the coordinator is not running (its status on the broker says down{when}: "
                f"{how}); start it (`xcloud up`, or `xcloud coordinator`) and try again")


@dataclass(frozen=True)
class WorkerInfo:
    """One row of the worker table."""

    id: str
    name: str
    state: str
    index: int = -1
    tags: list[str] = field(default_factory=list)
    cpus: int = 0
    memory_bytes: int = 0
    os: str = ""
    arch: str = ""
    slots: int = 0
    free_slots: int = 0
    last_seen: float | None = None
    description: str = ""
    executors: list[str] = field(default_factory=list)
    cpu_percent: float | None = None
    load1: float | None = None
    caps: dict[str, Any] = field(default_factory=dict)
    last_metrics: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    trust: dict[str, Any] = field(default_factory=dict)  # show: replica results judged

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> WorkerInfo:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


class Grid:
    """A client connection to one grid."""

    def __init__(self, config: Config, bus: Bus | None = None) -> None:
        if not config.bus.principal or not config.bus.token:
            raise NotConfigured(
                "no client credentials: run `xcloud up` on this machine (it writes "
                f"{config.config_file}), or set XCLOUD_BUS_URL, XCLOUD_BUS_PRINCIPAL and "
                "XCLOUD_BUS_TOKEN"
            )
        self.config = config
        self.topics = Topics(config.bus.root)
        self.principal = config.bus.principal
        if bus is None:
            session = f"{self.principal[:100]}-{uuid.uuid4().hex[:10]}"
            will = Will(self.topics.inbox_for(self.topics.coord_inbox, self.principal),
                        ClientGone(session=session), qos=1, retain=False)
            with translated("connect to the broker"):
                bus = Bus(config.bus, client_id=session,
                          inbox=self.topics.client_inbox(self.principal), will=will)
        self.bus = bus
        self.session = bus.client_id
        self._lock = threading.Lock()
        self._held: dict[str, ReservedWorker] = {}
        self._streams: dict[str, tuple[ExecStream, ReservedWorker]] = {}
        self._coordinator: CoordinatorState | None = None
        self._greeted: float | None = None  # started_at of the coordinator last greeted
        self._closed = threading.Event()
        self.bus.on_connected(self._hello)
        # The coordinator's retained status: a request fails at once when it is down.
        self.bus.subscribe(self.topics.coord_status, self._on_coord_status,
                           lane=Lane.DEFAULT, types=(CoordStatus.TYPE,))
        # Output and exit share one lane: per exec, arrival order is kept end to end.
        self.bus.on_inbox(ExecOutput.TYPE, self._on_exec_output, lane=Lane.EXEC)
        self.bus.on_inbox(ExecExit.TYPE, self._on_exec_exit, lane=Lane.EXEC)
        self.bus.on_inbox(ReservationEnded.TYPE, self._on_reservation_ended,
                          lane=Lane.RESERVATIONS)
        # File transfers (docs/transfer.md): created before the bus starts, as the engine
        # requires; ``grid.data`` (client/data.py) and copies to a reserved worker use it.
        self._transfers = TransferEndpoint(self.bus)
        self._data: DataStore | None = None
        # Batch jobs (client/jobs.py): job.event from the coordinator completes futures.
        # Handled on the inbox lane itself: it only marks a future and queues to watches
        # (bounded, never blocks), and a hand-off to another lane per event was most of
        # its cost (two per job).
        self._jobs: JobStore | None = None
        self.bus.on_inbox(JobEvent.TYPE, self._on_job_event, lane=Lane.INBOX)
        self.bus.on_inbox(JobEvents.TYPE, self._on_job_event, lane=Lane.INBOX)
        self._apps: AppStore | None = None

    @classmethod
    def connect(cls, config: Config | None = None) -> Grid:
        grid = cls(config or load_config())
        grid.start()
        return grid

    def start(self) -> None:
        """Connect to the broker (a no-op when connected); ``Unreachable`` if it cannot."""
        try:
            self.bus.start()
        except BusError as err:  # its message names the broker and what to check
            raise Unreachable(str(err)) from err

    def close(self) -> None:
        """Release what this session holds, say goodbye, and disconnect."""
        self._closed.set()
        if self._jobs is not None:
            self._jobs.close()  # pending job futures fail; the poll thread ends
        for handle in self.held:
            try:
                handle.release()
            except ClientError as err:
                log.warning("could not release reservation %s: %s", handle.id, err)
        gone = (self.topics.inbox_for(self.topics.coord_inbox, self.principal),
                ClientGone(session=self.session), 1, False)
        self._transfers.close()
        self.bus.stop(publish=[gone])

    @property
    def transfers(self) -> TransferEndpoint:
        """This session's transfer endpoint (uploads to and downloads from its peers)."""
        return self._transfers

    @property
    def data(self) -> DataStore:
        """The coordinator's data objects: ``grid.data.put(path)``, ``get``, ``ls`` ...
        (client/data.py, docs/data.md)."""
        if self._data is None:
            from client.data import DataStore

            self._data = DataStore(self)
        return self._data

    @property
    def apps(self) -> AppStore:
        """The coordinator's applications: ``grid.apps.add(name, binaries=...)``, ``ls``,
        ``show``, ``rm`` (client/apps.py, docs/data.md "Applications")."""
        if self._apps is None:
            from client.apps import AppStore

            self._apps = AppStore(self)
        return self._apps

    @property
    def jobs(self) -> JobStore:
        """Batch jobs: ``grid.jobs.ls()``, ``show``, ``wait``, ``cancel`` ...
        (client/jobs.py, docs/jobs.md)."""
        with self._lock:
            if self._jobs is None:
                from client.jobs import JobStore

                self._jobs = JobStore(self)
            return self._jobs

    def submit(self, command: str | Sequence[Any] | None = None, *args: Any,
               **options: Any) -> JobFuture:
        """Run a shell command (a string, or an argv list) as a grid job, or a registered
        application (``app="NAME"``, ``args=[...]``, ``app_version=...``); returns a
        ``concurrent.futures.Future`` of its ``JobResult`` (options: client/jobs.py)."""
        return self.jobs.submit(command, *args, **options)

    def executor(self, **defaults: Any) -> JobExecutor:
        """A ``concurrent.futures.Executor`` running shell commands as grid jobs."""
        from client.jobs import JobExecutor

        return JobExecutor(self.jobs, **defaults)

    def _on_job_event(self, incoming: Incoming) -> None:
        """``job.event``, or ``job.events`` (several; this session said it accepts them)."""
        if incoming.sender != self.config.client.coordinator_principal:
            return
        jobs = self._jobs
        if jobs is not None:
            body = incoming.body
            jobs.on_events(body.each() if isinstance(body, JobEvents) else [body])

    @property
    def connected(self) -> bool:
        return self.bus.connected.is_set()

    @property
    def coordinator(self) -> CoordinatorState | None:
        """The coordinator's status as last published on the broker (None: never seen)."""
        return self._coordinator

    def __enter__(self) -> Grid:
        if not self.bus.connected.is_set():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------

    def _check_coordinator(self) -> None:
        state = self._coordinator
        if state is not None and not state.up:
            raise CoordinatorDown(state.describe())

    def ask(self, body: Any, timeout: float | None = None, *, what: str | None = None
            ) -> Any:
        """Ask the coordinator and wait for its reply body.

        Raises ``Refused`` (its message and code) when it says no, ``CoordinatorDown``
        at once when its status says it is down (before sending, or while waiting), and
        ``Unreachable`` when no reply comes within ``timeout`` (default
        ``bus.request_timeout_s``). ``what`` names the action for messages.
        """
        action = what or f"send {body.TYPE}"
        self._check_coordinator()
        limit = self.config.bus.request_timeout_s if timeout is None else timeout
        with translated(action):
            future = self.bus.request_async(self.topics.coord_inbox, body)
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            try:
                reply = future.result(max(0.0, min(DOWN_CHECK_S, left)))
                break
            except FutureTimeout:
                self._check_coordinator()
                if left <= 0:
                    raise Unreachable(
                        f"no answer from the coordinator within {limit:g}s: is it running? "
                        "(`xcloud up` starts a grid; check --broker and --root)") from None
            except BusError as err:  # the bus stopped under us
                raise Unreachable(f"cannot {action}: {err}") from err
        if isinstance(reply.body, Error):
            raise Refused(reply.body.message, reply.body.code)
        return reply.body

    def call(self, body: Any, timeout: float | None = None) -> Any:
        """Ask the coordinator: its reply body, or Refused (its message and code)."""
        return self.ask(body, timeout)

    def ping(self, timeout: float | None = None) -> Pong:
        reply: Pong = self.ask(Ping(), timeout, what="ping the coordinator")
        return reply

    def workers(self, *, state: list[str] | None = None, tags: list[str] | None = None,
                min_cpus: int | None = None, min_memory_bytes: int | None = None,
                name: str | None = None) -> list[WorkerInfo]:
        """The worker table, in the stable order that ``index`` refers to."""
        validation.check_filters(state=state, tags=tags, min_cpus=min_cpus,
                                 min_memory_bytes=min_memory_bytes, name=name)
        reply: WorkersListReply = self.ask(WorkersList(
            state=state or None, tags=tags or None, min_cpus=min_cpus,
            min_memory_bytes=min_memory_bytes, name=name), what="list the workers")
        return [WorkerInfo.from_wire(row) for row in reply.workers]

    def worker(self, worker: str | int) -> WorkerInfo:
        """One worker by id, name or listing index, with capabilities, latest metrics
        and recent events."""
        target = self._target(worker)
        reply: WorkersShowReply = self.ask(WorkersShow(worker=target),
                                           what=f"show worker {target}")
        return WorkerInfo.from_wire(reply.worker)

    def drain(self, worker: str | int, drain: bool = True) -> str:
        """Admin: stop (or resume) giving ``worker`` new work; returns its new state."""
        target = self._target(worker)
        reply = self.ask(WorkersDrain(worker=target, drain=drain),
                         what=f"drain worker {target}")
        return str((reply.detail or {}).get("state", ""))

    def forget_worker(self, worker: str | int) -> str:
        """Admin: forget a lost or offline worker (its row and retained state go; if it
        comes back it joins afresh). Returns the id of the forgotten worker."""
        target = self._target(worker)
        reply = self.ask(WorkersForget(worker=target), what=f"forget worker {target}")
        return str((reply.detail or {}).get("worker", target))

    def _target(self, worker: str | int) -> str:
        """A worker id or name as given, or the id at a listing index (an int)."""
        if isinstance(worker, bool):
            raise InvalidRequest("a worker is an id, a name or a listing index")
        if isinstance(worker, int):
            return self.resolve_index(worker)
        return validation.check_worker(worker)

    # -- reservations --------------------------------------------------------------------

    def reserve(self, worker: str | int | None = None, *, any: dict[str, Any] | None = None,
                lease_s: float | None = None, image: str | None = None,
                limits: dict[str, Any] | None = None,
                wait: float | None = None) -> ReservedWorker:
        """Reserve a worker: by id or name, by index in the listing (an int), or ``any``
        one matching requirements (``min_cpus``, ``min_memory_bytes``, ``tags``, ``os``,
        ``arch``, ``executor``, ``image``); neither means any worker.

        ``wait`` (seconds, ``math.inf`` for no limit) keeps trying while the worker is
        taken or no worker matches, instead of failing at once.

        Raises :class:`~client.reservation.Refused` with the coordinator's message when
        the worker is taken, lost, unknown, or you already hold a reservation.
        """
        if any:
            validation.check_requirements(any)
        lease = validation.check_lease(float(lease_s or self.config.client.lease_s))
        if image is not None:
            validation.check_image(image)
        if wait is not None and (math.isnan(wait) or wait < 0):
            raise InvalidRequest(f"wait must be 0 or more seconds, not {wait!r}")
        target = None if worker is None or worker == "" else self._target(worker)
        body = Reserve(worker=target, any=any or None, lease_s=lease, session=self.session,
                       image=image, limits=limits or None)
        deadline = None if wait is None else time.monotonic() + wait
        retry = WAIT_FIRST_RETRY_S
        while True:
            try:
                reply = self._reserve_once(body, target)
                break
            except Refused as err:
                waitable = err.code in WAITABLE or (err.code == "not_found" and target is None)
                if deadline is None or not waitable:
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Refused(f"{err} (waited {wait:g}s)", err.code) from err
                log.info("waiting for a worker: %s", err)
                if self._closed.wait(min(retry, left)):
                    raise Unreachable("the session closed while waiting for a worker") from err
                retry = min(retry * 1.5, WAIT_MAX_RETRY_S)
        handle = ReservedWorker(self, reply, lease)
        with self._lock:
            self._held[handle.id] = handle
        handle._start_keeper()
        log.info("reserved %s (reservation %s, lease %.0fs)", handle.worker, handle.id,
                 handle.lease_s)
        return handle

    def _reserve_once(self, body: Reserve, target: str | None) -> ReserveReply:
        timeout = self.config.bus.request_timeout_s + RESERVE_EXTRA_TIMEOUT_S
        try:
            reply: ReserveReply = self.ask(body, timeout, what="reserve a worker")
            return reply
        except CoordinatorDown:
            raise
        except Unreachable as err:
            adopted = self._adopt_after_timeout(target)
            if adopted is None:
                raise Unreachable(f"the reservation got no answer: {err}") from err
            return adopted

    def _adopt_after_timeout(self, target: str | None) -> ReserveReply | None:
        """A reserve that timed out may still have succeeded: find it and take its grant."""
        try:
            rows = self.reservations()
        except ClientError:
            return None
        for row in rows:
            if row.get("session") == self.session and row.get("state") in (None, "active") \
                    and (target is None or target in (row.get("worker"), row.get("worker_name"))):
                try:
                    reply: ReserveReply = self.ask(Renew(reservation=row["id"]))
                    return reply
                except ClientError:
                    return None
        return None

    def resolve_index(self, index: int) -> str:
        """The worker id at position ``index`` of the stable listing order."""
        rows = self.workers()
        for pos, row in enumerate(rows):
            if (row.index if row.index >= 0 else pos) == index:
                return row.id
        raise InvalidRequest(f"no worker #{index}: the listing has "
                             f"{len(rows)} worker(s)"
                             + (f" (0..{len(rows) - 1})" if rows else ""))

    def reservations(self, *, all: bool = False, active: bool = True) -> list[dict[str, Any]]:
        """Reservations of this principal (admins: everyone's with ``all``)."""
        reply: ReservationsListReply = self.ask(
            ReservationsList(all=all or None, active=active), what="list reservations")
        return list(reply.reservations)

    @property
    def held(self) -> list[ReservedWorker]:
        """The reservations this session holds and has not released."""
        with self._lock:
            return list(self._held.values())

    # -- inbox routing (bus lanes) -------------------------------------------------------

    def _on_coord_status(self, incoming: Incoming) -> None:
        body: CoordStatus = incoming.body
        up = body.state == "up"
        if up:
            since = body.started_at
        elif body.clean:  # published by the coordinator as it stopped
            since = incoming.message.ts
        else:  # its last will: composed when it connected; now, unless replayed
            since = None if incoming.retained else time.time()
        self._coordinator = CoordinatorState(up=up, clean=body.clean, since=since)
        if up and since != self._greeted:
            # A coordinator we may not have greeted (it came up after our connect's hello,
            # or restarted and knows nothing of this session): say it again.
            self._greeted = since
            self._hello()

    def _hello(self) -> None:
        """``client.hello`` on every (re)connect, then ``client.accepts``: this session
        takes ``job.events`` (a coordinator that does not know that type refuses it, and
        sends one ``job.event`` per change, as before)."""
        try:
            self.bus.send(self.topics.coord_inbox, ClientHello(session=self.session))
            self.bus.send(self.topics.coord_inbox,
                          ClientAccepts(session=self.session, types=[JobEvents.TYPE]))
        except (BusError, ValueError) as err:
            log.warning("could not send client.hello: %s", err)

    def route_stream(self, stream: ExecStream, handle: ReservedWorker) -> None:
        with self._lock:
            self._streams[stream.exec_id] = (stream, handle)

    def unroute_stream(self, stream: ExecStream) -> None:
        with self._lock:
            entry = self._streams.get(stream.exec_id)
            if entry is not None and entry[0] is stream:
                del self._streams[stream.exec_id]

    def forget(self, handle: ReservedWorker) -> None:
        with self._lock:
            self._held.pop(handle.id, None)

    def _stream_for(self, incoming: Incoming, exec_id: str) -> ExecStream | None:
        with self._lock:
            entry = self._streams.get(exec_id)
        if entry is None:
            # Another session of the same principal shares this inbox; not ours.
            log.debug("output of unknown exec %s from %s ignored", exec_id, incoming.sender)
            return None
        stream, handle = entry
        if incoming.sender != handle.worker:
            log.warning("exec %s: output from %s, not from its worker %s: dropped", exec_id,
                        incoming.sender, handle.worker)
            return None
        return stream

    def _on_exec_output(self, incoming: Incoming) -> None:
        body: ExecOutput = incoming.body
        stream = self._stream_for(incoming, body.exec_id)
        if stream is None:
            return
        try:
            data = decode_data(body.data)
        except ClientError as err:
            log.warning("exec %s seq %d: %s", body.exec_id, body.seq, err)
            return
        stream.feed(body.seq, body.stream, data)

    def _on_exec_exit(self, incoming: Incoming) -> None:
        body: ExecExit = incoming.body
        stream = self._stream_for(incoming, body.exec_id)
        if stream is not None:
            stream.feed_exit(body.to_dict())

    def _on_reservation_ended(self, incoming: Incoming) -> None:
        body: ReservationEnded = incoming.body
        with self._lock:
            handle = self._held.get(body.reservation)
        if handle is None:
            return
        if incoming.sender != self.config.client.coordinator_principal:
            log.warning("reservation.ended for %s from %s, not the coordinator: ignored",
                        body.reservation, incoming.sender)
            return
        handle._mark_ended(body.reason)
