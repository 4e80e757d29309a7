"""The Python API: ``Grid`` connects with the same configuration as the CLI.

    with Grid.connect() as grid:
        for w in grid.workers(state=["online"]):
            print(w.name, w.cpus)
        with grid.reserve(any={"min_cpus": 2}) as w:
            print(w.run("uname -a").text)

One ``Grid`` is one client *session*: its bus client id names the session in
``client.hello`` (sent on every (re)connect) and in the connection's last will
``client.gone``, so the coordinator ends the session's reservations when the process
dies, and not while it merely reconnects.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from broker.bus import Bus, BusError, Incoming, Lane, RemoteError, RequestTimeout, Will
from broker.config import Config, load_config
from client.errors import ClientError, NotConfigured
from client.exec_stream import ExecStream, decode_data
from client.reservation import Refused, ReservedWorker
from schemas.messages import (
    ClientGone,
    ClientHello,
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
    WorkersList,
    WorkersListReply,
    WorkersShow,
    WorkersShowReply,
)
from schemas.topics import Topics

log = logging.getLogger(__name__)

# The coordinator waits up to 10 s for the worker to open a reservation: wait longer.
RESERVE_EXTRA_TIMEOUT_S = 12.0


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
            bus = Bus(config.bus, client_id=session,
                      inbox=self.topics.client_inbox(self.principal), will=will)
        self.bus = bus
        self.session = bus.client_id
        self._lock = threading.Lock()
        self._held: dict[str, ReservedWorker] = {}
        self._streams: dict[str, tuple[ExecStream, ReservedWorker]] = {}
        self.bus.on_connected(self._hello)
        # Output and exit share one lane: per exec, arrival order is kept end to end.
        self.bus.on_inbox(ExecOutput.TYPE, self._on_exec_output, lane=Lane.EXEC)
        self.bus.on_inbox(ExecExit.TYPE, self._on_exec_exit, lane=Lane.EXEC)
        self.bus.on_inbox(ReservationEnded.TYPE, self._on_reservation_ended,
                          lane=Lane.RESERVATIONS)

    @classmethod
    def connect(cls, config: Config | None = None) -> Grid:
        grid = cls(config or load_config())
        grid.bus.start()
        return grid

    def close(self) -> None:
        """Release what this session holds, say goodbye, and disconnect."""
        for handle in self.held:
            try:
                handle.release()
            except (ClientError, BusError) as err:
                log.warning("could not release reservation %s: %s", handle.id, err)
        gone = (self.topics.inbox_for(self.topics.coord_inbox, self.principal),
                ClientGone(session=self.session), 1, False)
        self.bus.stop(publish=[gone])

    @property
    def connected(self) -> bool:
        return self.bus.connected.is_set()

    def __enter__(self) -> Grid:
        if not self.bus.connected.is_set():
            self.bus.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------

    def call(self, body: Any, timeout: float | None = None) -> Any:
        """Ask the coordinator: its reply body, or Refused (its message and code)."""
        try:
            return self.bus.request(self.topics.coord_inbox, body, timeout=timeout).body
        except RemoteError as err:
            raise Refused(f"{body.TYPE} refused: {err}", err.code) from err

    def ping(self, timeout: float | None = None) -> Pong:
        reply: Pong = self.call(Ping(), timeout)
        return reply

    def workers(self, *, state: list[str] | None = None, tags: list[str] | None = None,
                min_cpus: int | None = None, min_memory_bytes: int | None = None,
                name: str | None = None) -> list[WorkerInfo]:
        """The worker table, in the stable order that ``index`` refers to."""
        reply: WorkersListReply = self.call(WorkersList(
            state=state or None, tags=tags or None, min_cpus=min_cpus,
            min_memory_bytes=min_memory_bytes, name=name))
        return [WorkerInfo.from_wire(row) for row in reply.workers]

    def worker(self, worker: str) -> WorkerInfo:
        """One worker by id or name, with capabilities, latest metrics and recent events."""
        reply: WorkersShowReply = self.call(WorkersShow(worker=worker))
        return WorkerInfo.from_wire(reply.worker)

    def drain(self, worker: str, drain: bool = True) -> str:
        """Admin: stop (or resume) giving ``worker`` new work; returns its new state."""
        reply = self.call(WorkersDrain(worker=worker, drain=drain))
        return str((reply.detail or {}).get("state", ""))

    # -- reservations --------------------------------------------------------------------

    def reserve(self, worker: str | int | None = None, *, any: dict[str, Any] | None = None,
                lease_s: float | None = None, image: str | None = None,
                limits: dict[str, Any] | None = None) -> ReservedWorker:
        """Reserve a worker: by id or name, by index in the listing (an int), or ``any``
        one matching requirements (``min_cpus``, ``min_memory_bytes``, ``tags``, ``os``,
        ``arch``, ``executor``, ``image``); neither means any worker.

        Raises :class:`~client.reservation.Refused` with the coordinator's message when
        the worker is taken, lost, unknown, or you already hold a reservation.
        """
        if isinstance(worker, bool):
            raise ClientError("worker must be an id, a name or an index")
        target = self.resolve_index(worker) if isinstance(worker, int) else worker or None
        lease = float(lease_s or self.config.client.lease_s)
        body = Reserve(worker=target, any=any or None, lease_s=lease, session=self.session,
                       image=image, limits=limits or None)
        timeout = self.config.bus.request_timeout_s + RESERVE_EXTRA_TIMEOUT_S
        try:
            reply: ReserveReply = self.bus.request(self.topics.coord_inbox, body,
                                                   timeout=timeout).body
        except RemoteError as err:
            raise Refused(str(err), err.code) from err
        except RequestTimeout as err:
            adopted = self._adopt_after_timeout(target)
            if adopted is None:
                raise ClientError(f"the coordinator did not answer the reservation: {err}"
                                  ) from err
            reply = adopted
        handle = ReservedWorker(self, reply, lease)
        with self._lock:
            self._held[handle.id] = handle
        handle._start_keeper()
        log.info("reserved %s (reservation %s, lease %.0fs)", handle.worker, handle.id,
                 handle.lease_s)
        return handle

    def _adopt_after_timeout(self, target: str | None) -> ReserveReply | None:
        """A reserve that timed out may still have succeeded: find it and take its grant."""
        try:
            rows = self.reservations()
        except (ClientError, BusError):
            return None
        for row in rows:
            if row.get("session") == self.session and row.get("state") in (None, "active") \
                    and (target is None or target in (row.get("worker"), row.get("worker_name"))):
                try:
                    reply: ReserveReply = self.bus.request(
                        self.topics.coord_inbox, Renew(reservation=row["id"])).body
                    return reply
                except BusError:
                    return None
        return None

    def resolve_index(self, index: int) -> str:
        """The worker id at position ``index`` of the stable listing order."""
        rows = self.workers()
        for pos, row in enumerate(rows):
            if (row.index if row.index >= 0 else pos) == index:
                return row.id
        raise ClientError(f"no worker #{index}: the listing has "
                          f"{len(rows)} worker(s)" + (f" (0..{len(rows) - 1})" if rows else ""))

    def reservations(self, *, all: bool = False, active: bool = True) -> list[dict[str, Any]]:
        """Reservations of this principal (admins: everyone's with ``all``)."""
        reply: ReservationsListReply = self.call(
            ReservationsList(all=all or None, active=active))
        return list(reply.reservations)

    @property
    def held(self) -> list[ReservedWorker]:
        """The reservations this session holds and has not released."""
        with self._lock:
            return list(self._held.values())

    # -- inbox routing (bus lanes) -------------------------------------------------------

    def _hello(self) -> None:
        try:
            self.bus.send(self.topics.coord_inbox, ClientHello(session=self.session))
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
