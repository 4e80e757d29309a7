"""Typed views of the wire messages: one frozen dataclass per message type.

The JSON Schema under ``schemas/json/`` is the contract; these classes are what domain
code handles after the codec has validated a message. Their fields mirror the schema's
properties (a test keeps the two in step). Nested documents stay plain dicts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from schemas.outcome import Outcome

B = TypeVar("B", bound="Body")


@dataclass(frozen=True, kw_only=True)
class Body:
    """Payload of one message type, without the envelope fields."""

    TYPE: ClassVar[str] = ""
    V: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        """Fields as a JSON-able dict, with unset optional fields left out."""
        values = ((name, getattr(self, name)) for name in _field_names(type(self)))
        return {name: value for name, value in values if value is not None}

    @classmethod
    def from_dict(cls: type[B], data: dict[str, Any]) -> B:
        names = _field_names(cls)
        return cls(**{k: v for k, v in data.items() if k in names})


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    """Field names of a message class (dataclasses.fields is slow on the hot path)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


REGISTRY: dict[str, type[Body]] = {}


def message(cls: type[B]) -> type[B]:
    """Register a Body subclass under its TYPE."""
    REGISTRY[cls.TYPE] = cls
    return cls


# -- generic replies ---------------------------------------------------------------


@message
@dataclass(frozen=True, kw_only=True)
class Error(Body):
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    detail: dict[str, Any] | None = None


@message
@dataclass(frozen=True, kw_only=True)
class Ok(Body):
    TYPE: ClassVar[str] = "ok"
    detail: dict[str, Any] | None = None


@message
@dataclass(frozen=True, kw_only=True)
class Ping(Body):
    TYPE: ClassVar[str] = "ping"


@message
@dataclass(frozen=True, kw_only=True)
class Pong(Body):
    TYPE: ClassVar[str] = "pong"
    component: str
    version: str | None = None
    principal: str | None = None


# -- presence ----------------------------------------------------------------------


@message
@dataclass(frozen=True, kw_only=True)
class CoordStatus(Body):
    TYPE: ClassVar[str] = "coord.status"
    state: str
    clean: bool | None = None
    version: str | None = None
    started_at: float | None = None
    principal: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class WorkerStatus(Body):
    TYPE: ClassVar[str] = "worker.status"
    wid: str
    state: str
    clean: bool
    reason: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class WorkerCaps(Body):
    TYPE: ClassVar[str] = "worker.caps"
    wid: str
    name: str
    tags: list[str]
    slots: int
    executors: list[str]
    host: dict[str, Any]
    cpu: dict[str, Any]
    memory_bytes: int
    description: str | None = None
    disk_total_bytes: int | None = None
    disk_free_bytes: int | None = None
    docker: dict[str, Any] | None = None
    shared: dict[str, Any] | None = None
    heartbeat_s: float | None = None
    agent_version: str | None = None
    gpus: list[dict[str, Any]] | None = None  # worker/gpus.py: {index, vendor, name, ...}
    job_queue: int | None = None  # attempts accepted beyond the slots (prefetch's bound)


@message
@dataclass(frozen=True, kw_only=True)
class WorkerHeartbeat(Body):
    TYPE: ClassVar[str] = "worker.heartbeat"
    wid: str
    seq: int
    interval_s: float
    cpu_percent: float
    mem_used_bytes: int
    free_slots: int
    load1: float | None = None
    load5: float | None = None
    load15: float | None = None
    mem_available_bytes: int | None = None
    disk_free_bytes: int | None = None
    net_sent_bytes: int | None = None
    net_recv_bytes: int | None = None
    running: list[dict[str, str]] = field(default_factory=list)
    gpus: list[dict[str, Any]] | None = None  # {index, util_percent, memory_used_bytes, ...}
    attempts: list[str] | None = None  # job attempts held (assigned or running)


@message
@dataclass(frozen=True, kw_only=True)
class BrokerRecheck(Body):
    """Re-authenticate these principals' live sessions (after a revoke) on the broker."""

    TYPE: ClassVar[str] = "broker.recheck"
    principals: list[str]


@message
@dataclass(frozen=True, kw_only=True)
class CapsRefresh(Body):
    TYPE: ClassVar[str] = "caps.refresh"


# -- worker registry requests ------------------------------------------------------


@message
@dataclass(frozen=True, kw_only=True)
class WorkersList(Body):
    TYPE: ClassVar[str] = "workers.list"
    state: list[str] | None = None
    tags: list[str] | None = None
    min_cpus: int | None = None
    min_memory_bytes: int | None = None
    name: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class WorkersListReply(Body):
    TYPE: ClassVar[str] = "workers.list.reply"
    workers: list[dict[str, Any]]
    more: bool | None = None  # the list was cut to fit one message


@message
@dataclass(frozen=True, kw_only=True)
class WorkersShow(Body):
    TYPE: ClassVar[str] = "workers.show"
    worker: str


@message
@dataclass(frozen=True, kw_only=True)
class WorkersShowReply(Body):
    TYPE: ClassVar[str] = "workers.show.reply"
    worker: dict[str, Any]


@message
@dataclass(frozen=True, kw_only=True)
class WorkersDrain(Body):
    TYPE: ClassVar[str] = "workers.drain"
    worker: str
    drain: bool


@message
@dataclass(frozen=True, kw_only=True)
class WorkersForget(Body):
    TYPE: ClassVar[str] = "workers.forget"
    worker: str


# -- administration (admins only; coordinator/admin.py) ------------------------------


@message
@dataclass(frozen=True, kw_only=True)
class PrincipalsAdd(Body):
    TYPE: ClassVar[str] = "principals.add"
    principal: str
    role: str
    note: str | None = None
    replace: bool | None = None


@message
@dataclass(frozen=True, kw_only=True)
class PrincipalsRotate(Body):
    TYPE: ClassVar[str] = "principals.rotate"
    principal: str


@message
@dataclass(frozen=True, kw_only=True)
class PrincipalsRevoke(Body):
    TYPE: ClassVar[str] = "principals.revoke"
    principal: str


@message
@dataclass(frozen=True, kw_only=True)
class PrincipalsToken(Body):
    """A principal's new token: the only time it travels, as the reply to its admin."""

    TYPE: ClassVar[str] = "principals.token"
    principal: str
    role: str
    token: str = field(repr=False)


@message
@dataclass(frozen=True, kw_only=True)
class PrincipalsList(Body):
    TYPE: ClassVar[str] = "principals.list"
    include_revoked: bool | None = None
    after: str | None = None
    limit: int | None = None


@message
@dataclass(frozen=True, kw_only=True)
class PrincipalsListReply(Body):
    TYPE: ClassVar[str] = "principals.list.reply"
    principals: list[dict[str, Any]]
    cursor: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class MosquittoExport(Body):
    TYPE: ClassVar[str] = "mosquitto.export"


@message
@dataclass(frozen=True, kw_only=True)
class MosquittoExportReply(Body):
    TYPE: ClassVar[str] = "mosquitto.export.reply"
    root: str
    principals: int
    passwd: str = field(repr=False)
    acl: str = field(repr=False)


@message
@dataclass(frozen=True, kw_only=True)
class WorkerEvent(Body):
    TYPE: ClassVar[str] = "event.worker"
    wid: str
    new_state: str
    name: str | None = None
    old_state: str | None = None
    reason: str | None = None


# -- reservations and grants (issue: remote commands) -------------------------------


@message
@dataclass(frozen=True, kw_only=True)
class CoordPubkey(Body):
    TYPE: ClassVar[str] = "coord.pubkey"
    alg: str
    key: str
    kid: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class ClientHello(Body):
    TYPE: ClassVar[str] = "client.hello"
    session: str


@message
@dataclass(frozen=True, kw_only=True)
class ClientAccepts(Body):
    """The optional message types a client session handles (``job.events``)."""

    TYPE: ClassVar[str] = "client.accepts"
    session: str
    types: list[str]


@message
@dataclass(frozen=True, kw_only=True)
class ClientGone(Body):
    TYPE: ClassVar[str] = "client.gone"
    session: str


@message
@dataclass(frozen=True, kw_only=True)
class Reserve(Body):
    TYPE: ClassVar[str] = "reserve"
    worker: str | None = None
    any: dict[str, Any] | None = None
    lease_s: float | None = None
    session: str | None = None
    image: str | None = None
    limits: dict[str, Any] | None = None


@message
@dataclass(frozen=True, kw_only=True)
class ReserveReply(Body):
    TYPE: ClassVar[str] = "reserve.reply"
    reservation: dict[str, Any]
    grant: str


@message
@dataclass(frozen=True, kw_only=True)
class Renew(Body):
    TYPE: ClassVar[str] = "renew"
    reservation: str


@message
@dataclass(frozen=True, kw_only=True)
class Release(Body):
    TYPE: ClassVar[str] = "release"
    reservation: str
    reason: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class ReservationsList(Body):
    TYPE: ClassVar[str] = "reservations.list"
    all: bool | None = None
    active: bool | None = None


@message
@dataclass(frozen=True, kw_only=True)
class ReservationsListReply(Body):
    TYPE: ClassVar[str] = "reservations.list.reply"
    reservations: list[dict[str, Any]]


@message
@dataclass(frozen=True, kw_only=True)
class ReservationOpen(Body):
    TYPE: ClassVar[str] = "reservation.open"
    reservation: dict[str, Any]
    limits: dict[str, Any] | None = None


@message
@dataclass(frozen=True, kw_only=True)
class ReservationClose(Body):
    TYPE: ClassVar[str] = "reservation.close"
    reservation: str
    reason: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class ReservationEnded(Body):
    TYPE: ClassVar[str] = "reservation.ended"
    reservation: str
    worker: str
    reason: str


# -- remote commands -------------------------------------------------------------------


@message
@dataclass(frozen=True, kw_only=True)
class ExecStart(Body):
    TYPE: ClassVar[str] = "exec.start"
    grant: str
    exec_id: str
    command: str
    mode: str  # "output" | "background"
    timeout_s: float | None = None
    max_output_bytes: int | None = None
    env: dict[str, str] | None = None
    stdin: bool | None = None
    tty: dict[str, Any] | None = None  # {rows, cols, term?}: on a pseudo-terminal


@message
@dataclass(frozen=True, kw_only=True)
class ExecStarted(Body):
    TYPE: ClassVar[str] = "exec.started"
    exec_id: str
    pid: int | None = None
    started_at: float | None = None


@message
@dataclass(frozen=True, kw_only=True)
class ExecOutput(Body):
    """``data`` is base64 of the raw bytes; ``seq`` is contiguous across both streams."""

    TYPE: ClassVar[str] = "exec.output"
    exec_id: str
    seq: int
    stream: str  # "stdout" | "stderr"
    data: str


@message
@dataclass(frozen=True, kw_only=True)
class ExecExit(Body, Outcome):
    """The command ended: its exit facts come from ``Outcome`` (the wire keeps their flat
    names); ``duration_s`` is always set here."""

    TYPE: ClassVar[str] = "exec.exit"
    exec_id: str
    last_seq: int
    duration_s: float = field()  # field(): no default (Outcome's None would be inherited)


@message
@dataclass(frozen=True, kw_only=True)
class ExecSignal(Body):
    TYPE: ClassVar[str] = "exec.signal"
    grant: str
    exec_id: str
    signal: str  # INT TERM KILL HUP QUIT USR1 USR2


@message
@dataclass(frozen=True, kw_only=True)
class ExecList(Body):
    TYPE: ClassVar[str] = "exec.list"
    grant: str


@message
@dataclass(frozen=True, kw_only=True)
class ExecListReply(Body):
    TYPE: ClassVar[str] = "exec.list.reply"
    execs: list[dict[str, Any]]


@message
@dataclass(frozen=True, kw_only=True)
class ExecLogs(Body):
    TYPE: ClassVar[str] = "exec.logs"
    grant: str
    exec_id: str
    follow: bool | None = None
    from_seq: int | None = None


@message
@dataclass(frozen=True, kw_only=True)
class ExecLogsReply(Body):
    TYPE: ClassVar[str] = "exec.logs.reply"
    exec_id: str
    chunks: list[dict[str, Any]]
    state: str
    first_seq: int | None = None
    exit: dict[str, Any] | None = None
    following: bool | None = None


@message
@dataclass(frozen=True, kw_only=True)
class ExecReport(Body, Outcome):
    """The worker's audit record of one command; its exit facts come from ``Outcome``."""

    TYPE: ClassVar[str] = "exec.report"
    reservation: str
    client: str
    exec_id: str
    command: str
    started_at: float
    mode: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class AuditList(Body):
    TYPE: ClassVar[str] = "audit.list"
    client: str | None = None
    worker: str | None = None
    reservation: str | None = None
    limit: int | None = None


@message
@dataclass(frozen=True, kw_only=True)
class AuditListReply(Body):
    TYPE: ClassVar[str] = "audit.list.reply"
    records: list[dict[str, Any]]


import schemas.app_messages  # noqa: E402  (registers the apps.* message types)
import schemas.data_messages  # noqa: E402  (registers the data.* message types)
import schemas.exec_messages  # noqa: E402  (registers exec.stdin and its ack)
import schemas.job_messages  # noqa: E402  (registers the jobs.*, job.*, attempt.* types)
import schemas.transfer_messages  # noqa: E402,F401  (registers the xfer.* message types)
