"""The coordinator's memory: principals, workers, heartbeats, state transitions,
reservations and the exec audit trail, in a database.

``Store.open(url)`` accepts ``sqlite:///path.db`` (the embedded default; WAL) or
``mysql://user:pass@host:port/db`` (PyMySQL; the database is created if missing), migrates
the schema and binds the models. Only one Store may be open per process (peewee keeps the
binding on the model classes).

Threads: every public method checks a connection out of a small pool for its duration and
returns it (``_op``), so any thread may call any method; connections are pinged on check-out
(MySQL) so a restarted server costs one failed call, not a wedged thread. ``sqlite:///:memory:``
(tests) has one connection, shared by the threads in turn.

Records cross the API as frozen dataclasses, never as model instances: callers cannot
lazily query, and the store stays free to change its tables.

Database failures surface as ``StoreError`` with the URL (password masked); domain errors as
``NotFound``, ``AlreadyExists``, ``InvalidTransition`` and ``InvalidArgument``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import pymysql
from peewee import Database, DatabaseError, IntegrityError, InterfaceError, OperationalError
from playhouse.pool import MaxConnectionsExceeded, PooledMySQLDatabase, PooledSqliteDatabase

from broker.config import mask_url
from coordinator import migrations
from coordinator.errors import (
    AlreadyExists,
    CoordinatorError,
    InvalidArgument,
    NotFound,
    StoreError,
)
from coordinator.models import (
    HASH_MAX,
    ID_MAX,
    IMAGE_MAX,
    MODELS,
    RID_MAX,
    ROLE_MAX,
    SHORT_MAX,
    ExecAudit,
    Principal,
    Reservation,
    Worker,
    WorkerEvent,
    WorkerSample,
)
from coordinator.reservation_state import (
    LIVE_STATES as LIVE_RESERVATION_STATES,
)
from coordinator.reservation_state import (
    ReservationLimitReached,
    ReservationState,
    WorkerAlreadyReserved,
    WorkerNotReservable,
    sources_of,
)
from coordinator.worker_state import LIVE_STATES, WorkerState, check_transition

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL = 5.0  # until the worker's first heartbeat says otherwise
POOL_SIZE = 32
POOL_WAIT_S = 30
MYSQL_CONNECT_TIMEOUT_S = 5
MYSQL_STALE_S = 3600  # recycle pooled connections well before the server's wait_timeout
SQLITE_PRAGMAS = (
    ("journal_mode", "wal"),
    ("synchronous", "normal"),
    ("foreign_keys", 1),
    ("busy_timeout", 5000),
)
IN_CHUNK = 500  # ids per IN (...) list
MYSQL_UPDATE_ROWS = 500  # rows per UPDATE ... JOIN statement
MYSQL_UPDATE_BYTES = 512 * 1024  # and bytes, well under max_allowed_packet
INT32 = 2**31 - 1
INT64 = 2**63 - 1
_INACTIVE = frozenset({WorkerState.LOST.value, WorkerState.OFFLINE.value})
_MYSQL_DB_NAME = re.compile(r"^[A-Za-z0-9_$-]{1,64}$")
_ER_BAD_DB = 1049
_ER_ACCESS_DENIED = (1044, 1045, 1698)
_UNAVAILABLE = (
    OperationalError,
    InterfaceError,
    MaxConnectionsExceeded,
    sqlite3.OperationalError,
    pymysql.err.OperationalError,
    pymysql.err.InterfaceError,
)
_DB_ERRORS = (DatabaseError, sqlite3.Error, pymysql.err.Error)

P = ParamSpec("P")
R = TypeVar("R")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class PrincipalRecord:
    """A principal as stored; ``token_hash`` stays out of ``repr`` so it never reaches logs."""

    id: str
    role: str
    token_hash: str = field(repr=False)
    created_at: float
    revoked_at: float | None
    note: str

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A worker as stored, with JSON columns decoded."""

    id: str
    name: str
    state: WorkerState
    state_reason: str
    state_changed_at: float
    description: str
    tags: list[str]
    caps: dict[str, Any]
    cpus: int
    memory_bytes: int
    os: str
    arch: str
    executors: list[Any]
    slots: int
    free_slots: int
    heartbeat_interval: float
    first_seen: float
    last_seen: float
    last_heartbeat_at: float | None
    last_metrics: dict[str, Any]
    heartbeat_seq: int

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able summary for listings (no full caps, no raw metrics)."""
        wire: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "tags": list(self.tags),
            "cpus": self.cpus,
            "memory_bytes": self.memory_bytes,
            "os": self.os,
            "arch": self.arch,
            "slots": self.slots,
            "free_slots": self.free_slots,
            "last_seen": self.last_seen,
            "description": self.description,
            "executors": list(self.executors),
        }
        for key in ("cpu_percent", "load1"):
            value = _float(self.last_metrics.get(key))
            if value is not None:
                wire[key] = value
        return wire


@dataclass(frozen=True, slots=True)
class WorkerEventRecord:
    """One audited transition; ``old_state`` is None when the worker first joined."""

    id: int
    worker_id: str
    ts: float
    old_state: WorkerState | None
    new_state: WorkerState
    reason: str


@dataclass(frozen=True, slots=True)
class HeartbeatReport:
    """What ``record_heartbeats`` did.

    ``unknown``: worker ids never seen (ask them for their caps); ``inactive``: ids that were
    LOST or OFFLINE when their heartbeat arrived (the caller brings them back online).
    """

    accepted: int
    unknown: list[str]
    inactive: list[str]


@dataclass(frozen=True, slots=True)
class ReservationRecord:
    """A reservation as stored (see ``coordinator.reservation_state``)."""

    id: str
    worker_id: str
    client_id: str
    session: str
    state: ReservationState
    created_at: float
    expires_at: float
    lease_s: float
    ended_at: float | None
    ended_reason: str
    image: str | None
    executor: str | None
    client_gone_at: float | None

    @property
    def live(self) -> bool:
        """True while it holds its worker (opening or active)."""
        return self.state.is_live

    def to_wire(self, worker_name: str | None = None) -> dict[str, Any]:
        """The reservation object of reserve.reply, reservation.open and listings."""
        wire: dict[str, Any] = {
            "id": self.id,
            "worker": self.worker_id,
            "client": self.client_id,
            "state": self.state.value,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "lease_s": self.lease_s,
            "image": self.image,
            "executor": self.executor,
        }
        if worker_name:
            wire["worker_name"] = worker_name
        if self.session:
            wire["session"] = self.session
        if self.ended_at is not None:
            wire["ended_at"] = self.ended_at
        if self.ended_reason:
            wire["ended_reason"] = self.ended_reason
        return wire


@dataclass(frozen=True, slots=True)
class ExecAuditRecord:
    """One command run under a reservation, as its worker reported it."""

    id: int
    reservation_id: str
    worker_id: str
    client_id: str
    exec_id: str
    command: str
    mode: str | None
    started_at: float
    duration_s: float | None
    exit_code: int | None
    signal: int | None
    timed_out: bool | None
    truncated: bool | None
    oom_killed: bool | None
    output_bytes: int | None
    error: str | None
    reported_at: float

    def to_wire(self) -> dict[str, Any]:
        """A record of ``audit.list.reply``: the exec.report's field names, plus ids."""
        wire: dict[str, Any] = {
            "id": self.id,
            "reservation": self.reservation_id,
            "worker": self.worker_id,
            "client": self.client_id,
            "exec_id": self.exec_id,
            "command": self.command,
            "started_at": self.started_at,
            "reported_at": self.reported_at,
        }
        for key in ("mode", "duration_s", "exit_code", "signal", "timed_out", "truncated",
                    "oom_killed", "output_bytes", "error"):
            value = getattr(self, key)
            if value is not None:
                wire[key] = value
        return wire


# --------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class _Target:
    """A parsed database URL."""

    backend: str  # "sqlite" | "mysql"
    masked: str
    path: str = ""  # sqlite: file path or ":memory:"
    host: str = ""
    port: int = 3306
    user: str = ""
    password: str = field(default="", repr=False)
    database: str = ""
    connect_timeout: int = MYSQL_CONNECT_TIMEOUT_S


_URL_HELP = (
    "use sqlite:///relative.db, sqlite:////absolute.db, or mysql://user:pass@host:3306/dbname"
)


def _parse_url(url: str) -> _Target:
    masked = mask_url(url)
    if not isinstance(url, str) or not url:
        raise StoreError(f"no database URL given; {_URL_HELP}")
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise StoreError(f"bad SQLite URL {masked!r}: {_URL_HELP}")
        path = url[len("sqlite:///") :]
        return _Target(
            "sqlite", masked, path=path if path == ":memory:" else os.path.expanduser(path)
        )
    if url.startswith(("mysql://", "mariadb://")):
        return _parse_mysql(url, masked)
    raise StoreError(f"unsupported database URL {masked!r}: {_URL_HELP}")


def _parse_mysql(url: str, masked: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port or 3306
    except ValueError as err:
        raise StoreError(f"bad MySQL URL {masked!r} ({err}): {_URL_HELP}") from None
    database = unquote(parts.path.lstrip("/"))
    if not parts.hostname or not database:
        raise StoreError(f"MySQL URL {masked!r} needs a host and a database name: {_URL_HELP}")
    if not _MYSQL_DB_NAME.match(database):
        raise StoreError(
            f"MySQL database name {database!r} in {masked!r}: use letters, digits, _ $ -"
        )
    params = dict(parse_qsl(parts.query))
    unknown = set(params) - {"connect_timeout"}
    if unknown:
        raise StoreError(
            f"unknown option(s) {sorted(unknown)} in {masked!r}; known: connect_timeout"
        )
    try:
        timeout = int(params.get("connect_timeout", MYSQL_CONNECT_TIMEOUT_S))
    except ValueError:
        raise StoreError(f"connect_timeout in {masked!r} must be whole seconds") from None
    return _Target(
        "mysql",
        masked,
        host=parts.hostname,
        port=port,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        database=database,
        connect_timeout=timeout,
    )


def _sqlite_database(target: _Target) -> Database:
    memory = target.path == ":memory:"
    if not memory:
        parent = Path(target.path).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(
                f"cannot create the directory {str(parent)!r} for {target.masked}: {err.strerror}; "
                "choose a writable path"
            ) from None
    return PooledSqliteDatabase(
        target.path,
        pragmas=list(SQLITE_PRAGMAS),
        lock_type="IMMEDIATE",  # writers take the lock up front: no deadlock on upgrade
        check_same_thread=False,  # pooled connections move between threads
        autoconnect=False,  # every access goes through Store._session
        max_connections=1 if memory else POOL_SIZE,  # one connection = one in-memory DB
        timeout=POOL_WAIT_S,
    )


def _mysql_error(target: _Target, err: Exception) -> StoreError:
    code = err.args[0] if err.args else None
    detail = str(err.args[1] if len(err.args) > 1 else err)
    if target.password:
        detail = detail.replace(target.password, "***")
    if code in _ER_ACCESS_DENIED:
        hint = "check the user and password in the URL and the user's grants"
    else:
        hint = "check that the server is running and the host and port are right"
    return StoreError(f"cannot open MySQL database {target.masked}: {detail}; {hint}")


def _ensure_mysql_database(target: _Target) -> None:
    """Connect once to surface errors clearly, creating the database if it does not exist."""
    kwargs: dict[str, Any] = {
        "host": target.host,
        "port": target.port,
        "user": target.user,
        "password": target.password,
        "connect_timeout": target.connect_timeout,
        "charset": "utf8mb4",
    }
    try:
        try:
            conn = pymysql.connect(database=target.database, **kwargs)
        except pymysql.err.OperationalError as err:
            if err.args[0] != _ER_BAD_DB:
                raise
            conn = pymysql.connect(**kwargs)
            with conn.cursor() as cur:
                cur.execute(
                    f"CREATE DATABASE IF NOT EXISTS `{target.database}` "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )
            log.info("created MySQL database %s", target.masked)
        conn.close()
    except pymysql.err.MySQLError as err:
        raise _mysql_error(target, err) from None


def _mysql_database(target: _Target) -> Database:
    _ensure_mysql_database(target)
    return PooledMySQLDatabase(
        target.database,
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password,
        connect_timeout=target.connect_timeout,
        charset="utf8mb4",
        autoconnect=False,
        max_connections=POOL_SIZE,
        stale_timeout=MYSQL_STALE_S,
        timeout=POOL_WAIT_S,
    )


# --------------------------------------------------------------------------- value helpers


def _dumps(value: Any) -> str:
    """Compact, strict JSON: NaN/Infinity (which Python would emit) become null."""
    try:
        return json.dumps(value, separators=(",", ":"), default=str, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), separators=(",", ":"), default=str)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _loads(text: str | None, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default


def _float(value: Any) -> float | None:
    """A finite float, or None for anything else (bad input must not sink a batch)."""
    if type(value) is float or type(value) is int:
        return float(value) if math.isfinite(value) else None
    return None


def _int(value: Any, limit: int = INT64) -> int | None:
    """An int within ``[-limit, limit]`` (column range), or None for anything else."""
    if type(value) is int:
        return value if -limit <= value <= limit else None
    if type(value) is float and math.isfinite(value):
        return int(value) if -limit <= value <= limit else None
    return None


def _text(value: Any, what: str, limit: int) -> str:
    """``value`` if it is a non-empty string that fits its column, else InvalidArgument."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string, got {value!r:.80}")
    if len(value) > limit:
        raise InvalidArgument(f"{what} is longer than {limit} characters: {value[:40]!r}...")
    return value


def _caps_fields(wid: str, caps: dict[str, Any]) -> dict[str, Any]:
    """Worker columns from a capability document; optional parts may be absent."""
    if not isinstance(caps, dict):
        raise InvalidArgument(f"capabilities of {wid!r} must be an object")
    if caps.get("wid", wid) != wid:
        raise InvalidArgument(f"capabilities name worker {caps.get('wid')!r}, not {wid!r}")
    tags = caps.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidArgument(f"tags of {wid!r} must be a list of strings")
    executors = caps.get("executors") or []
    if not isinstance(executors, list):
        raise InvalidArgument(f"executors of {wid!r} must be a list")
    host: dict[str, Any] = caps["host"] if isinstance(caps.get("host"), dict) else {}
    cpu: dict[str, Any] = caps["cpu"] if isinstance(caps.get("cpu"), dict) else {}
    description = caps.get("description")
    slots = _int(caps.get("slots"), INT32)
    interval = _float(caps.get("heartbeat_s"))
    fields = {
        "name": _text(caps.get("name") or wid, "worker name", ID_MAX),
        "description": description if isinstance(description, str) else "",
        "tags": _dumps(tags),
        "caps": _dumps(caps),
        "cpus": max(0, _int(cpu.get("count"), INT32) or 0),
        "memory_bytes": max(0, _int(caps.get("memory_bytes")) or 0),
        "os": str(host.get("os") or "")[:SHORT_MAX],
        "arch": str(host.get("arch") or "")[:SHORT_MAX],
        "executors": _dumps(executors),
        "slots": 1 if slots is None else max(0, slots),
    }
    if interval is not None and interval > 0:  # announced period; heartbeats refine it
        fields["heartbeat_interval"] = interval
    return fields


def _sample_row(wid: str, body: dict[str, Any], ts: float) -> tuple[Any, ...]:
    running = body.get("running")
    return (
        wid,
        ts,
        _float(body.get("cpu_percent")),
        _float(body.get("load1")),
        _int(body.get("mem_used_bytes")),
        _int(body.get("mem_available_bytes")),
        _int(body.get("disk_free_bytes")),
        _int(body.get("net_sent_bytes")),
        _int(body.get("net_recv_bytes")),
        len(running) if isinstance(running, list) else 0,
    )


def _update_row(wid: str, body: dict[str, Any], ts: float) -> tuple[Any, ...]:
    interval = _float(body.get("interval_s"))
    return (
        ts,
        ts,
        _dumps(body),
        _int(body.get("free_slots"), INT32),
        _int(body.get("seq")),
        interval if interval is not None and interval > 0 else None,
        wid,
    )


def _dicts(query: Any) -> list[dict[str, Any]]:
    return list(query.dicts())


def _tuples(query: Any) -> list[tuple[Any, ...]]:
    return list(query.tuples())


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _audit_row(
    *,
    reservation_id: str,
    worker_id: str,
    client_id: str,
    exec_id: str,
    command: str,
    started_at: float,
    reported_at: float,
    mode: str | None = None,
    duration_s: float | None = None,
    exit_code: int | None = None,
    signal: int | None = None,
    timed_out: bool | None = None,
    truncated: bool | None = None,
    oom_killed: bool | None = None,
    output_bytes: int | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """An audit row, checked and clipped to the columns' limits."""
    _text(reservation_id, "reservation id", RID_MAX)
    _text(worker_id, "worker id", ID_MAX)
    _text(client_id, "client id", ID_MAX)
    _text(exec_id, "exec id", RID_MAX)
    if not isinstance(command, str):
        raise InvalidArgument("command must be a string")
    row: dict[str, Any] = {
        "reservation_id": reservation_id,
        "worker_id": worker_id,
        "client_id": client_id,
        "exec_id": exec_id,
        "command": command,
        "mode": mode[:16] if isinstance(mode, str) else None,
        "started_at": _float(started_at) or 0.0,
        "duration_s": _float(duration_s),
        "exit_code": _int(exit_code, INT32),
        "signal": _int(signal, INT32),
        "timed_out": timed_out if isinstance(timed_out, bool) else None,
        "truncated": truncated if isinstance(truncated, bool) else None,
        "oom_killed": oom_killed if isinstance(oom_killed, bool) else None,
        "output_bytes": _int(output_bytes),
        "error": error[:AUDIT_ERROR_MAX] if isinstance(error, str) else None,
        "reported_at": reported_at,
    }
    return row


def _worker_record(row: dict[str, Any]) -> WorkerRecord:
    return WorkerRecord(
        id=row["id"],
        name=row["name"],
        state=WorkerState(row["state"]),
        state_reason=row["state_reason"],
        state_changed_at=row["state_changed_at"],
        description=row["description"],
        tags=_loads(row["tags"], []),
        caps=_loads(row["caps"], {}),
        cpus=row["cpus"],
        memory_bytes=row["memory_bytes"],
        os=row["os"],
        arch=row["arch"],
        executors=_loads(row["executors"], []),
        slots=row["slots"],
        free_slots=row["free_slots"],
        heartbeat_interval=row["heartbeat_interval"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        last_heartbeat_at=row["last_heartbeat_at"],
        last_metrics=_loads(row["last_metrics"], {}),
        heartbeat_seq=row["heartbeat_seq"],
    )


def _principal_record(row: Principal) -> PrincipalRecord:
    return PrincipalRecord(
        id=row.id,
        role=row.role,
        token_hash=row.token_hash,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        note=row.note,
    )


def _reservation_record(row: dict[str, Any]) -> ReservationRecord:
    return ReservationRecord(
        id=row["id"],
        worker_id=row["worker_id"],
        client_id=row["client_id"],
        session=row["session"] or "",
        state=ReservationState(row["state"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        lease_s=row["lease_s"],
        ended_at=row["ended_at"],
        ended_reason=row["ended_reason"] or "",
        image=row["image"],
        executor=row["executor"],
        client_gone_at=row["client_gone_at"],
    )


def _bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _audit_record(row: dict[str, Any]) -> ExecAuditRecord:
    return ExecAuditRecord(
        id=int(row["id"]),
        reservation_id=row["reservation_id"],
        worker_id=row["worker_id"],
        client_id=row["client_id"],
        exec_id=row["exec_id"],
        command=row["command"],
        mode=row["mode"],
        started_at=row["started_at"],
        duration_s=row["duration_s"],
        exit_code=row["exit_code"],
        signal=row["signal"],
        timed_out=_bool(row["timed_out"]),
        truncated=_bool(row["truncated"]),
        oom_killed=_bool(row["oom_killed"]),
        output_bytes=row["output_bytes"],
        error=row["error"],
        reported_at=row["reported_at"],
    )


_LIVE_RESERVATION_VALUES = [s.value for s in LIVE_RESERVATION_STATES]
REASON_MAX = 1024  # ended_reason on the wire
AUDIT_ERROR_MAX = 4096


def _op(method: Callable[Concatenate[Store, P], R]) -> Callable[Concatenate[Store, P], R]:
    """Run a public Store method with a pooled connection, mapping DB failures to StoreError."""

    @functools.wraps(method)
    def run(self: Store, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._session():
            return method(self, *args, **kwargs)

    return run


# --------------------------------------------------------------------------- the store


class Store:
    """The coordinator's database. Open with ``Store.open(url)``; one per process."""

    def __init__(self, db: Database, target: _Target) -> None:
        """Prefer ``Store.open``: it parses the URL, binds the models and migrates."""
        self.db = db
        self.url = target.masked
        self.backend = target.backend
        self._closed = False
        self._sql = _HeartbeatSQL(db, target.backend)

    # ---- lifecycle

    @classmethod
    def open(cls, url: str) -> Store:
        """Open (creating if needed) and migrate the database at ``url``."""
        target = _parse_url(url)
        current = Worker._meta.database
        if current is not None:
            raise StoreError(
                f"cannot open {target.masked}: another Store is open in this process "
                "(the models are bound to it); close it first"
            )
        db = _sqlite_database(target) if target.backend == "sqlite" else _mysql_database(target)
        db.bind(MODELS, bind_refs=False, bind_backrefs=False)
        store = cls(db, target)
        try:
            with db.connection_context():
                version = migrations.migrate(db)
        except (*_DB_ERRORS, MaxConnectionsExceeded) as err:
            store.close()
            raise StoreError(
                f"cannot open database {target.masked}: {err}; check that the URL names an "
                "xcloud database that this user may read and write"
            ) from err
        except BaseException:
            store.close()
            raise
        log.info("store %s open at schema version %d", store.url, version)
        return store

    def close(self) -> None:
        """Close every pooled connection and unbind the models (so another Store may open)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.db.close_all()  # type: ignore[attr-defined]  # pooled databases have it
        except _DB_ERRORS as err:
            log.warning("closing %s: %s", self.url, err)
        if Worker._meta.database is self.db:
            for model in MODELS:
                model._meta.set_database(cast(Any, None))

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _session(self) -> Iterator[None]:
        if self._closed:
            raise StoreError(f"the store {self.url} is closed")
        try:
            with self.db.connection_context():
                yield
        except CoordinatorError:
            raise
        except _UNAVAILABLE as err:
            raise StoreError(
                f"database {self.url} is unavailable: {err}; check that it is running and reachable"
            ) from err
        except _DB_ERRORS as err:
            log.exception("database error on %s", self.url)
            raise StoreError(f"database error on {self.url}: {err}") from err

    @_op
    def migrate(self) -> int:
        """Apply pending schema migrations; returns the schema version (idempotent)."""
        return migrations.migrate(self.db)

    def _for_update(self, query: Any) -> Any:
        """Lock selected rows until commit where the backend can (SQLite locks the file)."""
        return query.for_update() if self.backend == "mysql" else query

    # ---- principals

    @_op
    def add_principal(
        self, id: str, role: str, token_hash: str, note: str = "", *, now: float | None = None
    ) -> PrincipalRecord:
        """Register a principal; a revoked one with the same id is replaced."""
        _text(id, "principal id", ID_MAX)
        _text(role, "role", ROLE_MAX)
        _text(token_hash, "token hash", HASH_MAX)
        record = PrincipalRecord(id, role, token_hash, _now(now), None, note or "")
        fields = {
            "role": role,
            "token_hash": token_hash,
            "created_at": record.created_at,
            "revoked_at": None,
            "note": record.note,
        }
        try:
            with self.db.atomic():
                row = self._for_update(Principal.select().where(Principal.id == id)).get_or_none()
                if row is None:
                    Principal.insert(id=id, **fields).execute()
                elif row.revoked_at is None:
                    raise AlreadyExists(f"principal {id!r} already exists")
                else:
                    Principal.update(**fields).where(Principal.id == id).execute()
        except IntegrityError:
            raise AlreadyExists(f"principal {id!r} already exists") from None
        return record

    @_op
    def get_principal(self, id: str) -> PrincipalRecord | None:
        """The principal, revoked or not; None if unknown."""
        row = Principal.get_or_none(Principal.id == id)
        return None if row is None else _principal_record(row)

    @_op
    def list_principals(self, include_revoked: bool = False) -> list[PrincipalRecord]:
        """Principals ordered by id."""
        query = Principal.select().order_by(Principal.id)
        if not include_revoked:
            query = query.where(Principal.revoked_at.is_null())
        return [_principal_record(row) for row in query]

    @_op
    def revoke_principal(self, id: str, *, now: float | None = None) -> bool:
        """Revoke; True if it was live, False if already revoked. NotFound if unknown."""
        with self.db.atomic():
            row = self._for_update(Principal.select().where(Principal.id == id)).get_or_none()
            if row is None:
                raise NotFound(f"no principal {id!r}")
            if row.revoked_at is not None:
                return False
            Principal.update(revoked_at=_now(now)).where(Principal.id == id).execute()
        log.info("revoked principal %s", id)
        return True

    @_op
    def principal_hash(self, id: str) -> tuple[str, str] | None:
        """``(role, token_hash)`` of a live principal, for authentication; None otherwise."""
        row = (
            Principal.select(Principal.role, Principal.token_hash)
            .where((Principal.id == id) & Principal.revoked_at.is_null())
            .tuples()
            .first()
        )
        return None if row is None else (row[0], row[1])

    # ---- workers: caps and state

    @_op
    def upsert_worker_caps(
        self, wid: str, caps: dict[str, Any], now: float, *, keep_state: bool = False
    ) -> WorkerRecord:
        """Record a worker's capability document and bring it online.

        A new worker joins ONLINE; a LOST or OFFLINE one comes back ONLINE; a DRAINING one
        stays DRAINING (a drain is left only by an explicit status or admin action).
        ``keep_state`` (a *retained* caps document, which says what a worker is, not that
        it is up) updates the fields of a known worker without touching its state.
        """
        _text(wid, "worker id", ID_MAX)
        fields = _caps_fields(wid, caps)
        with self.db.atomic():
            row = self._locked_worker(wid)
            if row is None:
                self._insert_worker(wid, fields, now)
            else:
                free = min(row["free_slots"], fields["slots"])
                Worker.update(**fields, free_slots=free, last_seen=now).where(
                    Worker.id == wid
                ).execute()
                if not keep_state and row["state"] != WorkerState.DRAINING.value:
                    self._transition(
                        wid, WorkerState(row["state"]), WorkerState.ONLINE, "capabilities", now
                    )
            fresh = _dicts(Worker.select().where(Worker.id == wid))
        return _worker_record(fresh[0])

    def _insert_worker(self, wid: str, fields: dict[str, Any], now: float) -> None:
        Worker.insert(
            {"heartbeat_interval": DEFAULT_HEARTBEAT_INTERVAL, **fields},
            id=wid,
            state=WorkerState.ONLINE.value,
            state_reason="joined",
            state_changed_at=now,
            free_slots=fields["slots"],
            first_seen=now,
            last_seen=now,
        ).execute()
        WorkerEvent.insert(
            worker_id=wid,
            ts=now,
            old_state=None,
            new_state=WorkerState.ONLINE.value,
            reason="joined",
        ).execute()
        log.info("worker %s joined", wid)

    def _locked_worker(self, wid: str) -> dict[str, Any] | None:
        query = Worker.select(Worker.id, Worker.state, Worker.free_slots).where(Worker.id == wid)
        rows = _dicts(self._for_update(query))
        return rows[0] if rows else None

    def _transition(
        self, wid: str, old: WorkerState, new: WorkerState, reason: str, now: float
    ) -> tuple[WorkerState, WorkerState] | None:
        """Apply a checked transition and audit it; call inside a transaction."""
        if not check_transition(wid, old, new):
            return None
        Worker.update(state=new.value, state_reason=reason, state_changed_at=now).where(
            Worker.id == wid
        ).execute()
        WorkerEvent.insert(
            worker_id=wid, ts=now, old_state=old.value, new_state=new.value, reason=reason
        ).execute()
        log.info("worker %s: %s -> %s (%s)", wid, old.value, new.value, reason)
        return old, new

    @_op
    def set_worker_state(
        self, wid: str, new_state: WorkerState, reason: str, now: float, *, seen: bool = False
    ) -> tuple[WorkerState, WorkerState] | None:
        """Move a worker to ``new_state``; ``(old, new)``, or None when it was already there.

        ``seen=True`` when the change comes from a message of the worker itself (its status):
        ``last_seen`` moves to ``now`` so liveness deadlines restart from it.
        Raises NotFound for an unknown worker, InvalidTransition for a forbidden change.
        """
        new = WorkerState(new_state)
        with self.db.atomic():
            row = self._locked_worker(wid)
            if row is None:
                raise NotFound(f"no worker {wid!r}")
            if seen:
                Worker.update(last_seen=now).where(Worker.id == wid).execute()
            return self._transition(wid, WorkerState(row["state"]), new, reason, now)

    # ---- workers: heartbeats

    @_op
    def record_heartbeats(
        self, batch: Sequence[tuple[str, dict[str, Any], float]]
    ) -> HeartbeatReport:
        """Store a batch of heartbeats ``(wid, body, received_at)`` in one transaction.

        Every heartbeat of a known worker becomes a WorkerSample row; each worker's row is
        updated once, from its latest heartbeat in the batch. Malformed numbers are stored
        as NULL rather than failing the batch.
        """
        if not batch:
            return HeartbeatReport(0, [], [])
        wids = list(dict.fromkeys(wid for wid, _, _ in batch if isinstance(wid, str)))
        samples: list[tuple[Any, ...]] = []
        latest: dict[str, tuple[dict[str, Any], float]] = {}
        with self.db.atomic():
            states = self._sql.states_of(self.db, wids)
            for wid, body, ts in batch:
                if wid not in states or not isinstance(body, dict):
                    continue
                samples.append(_sample_row(wid, body, ts))
                previous = latest.get(wid)
                if previous is None or ts >= previous[1]:
                    latest[wid] = (body, ts)
            updates = [_update_row(wid, body, ts) for wid, (body, ts) in sorted(latest.items())]
            self._sql.write(self.db, samples, updates)
        return HeartbeatReport(
            accepted=len(samples),
            unknown=[wid for wid in wids if wid not in states],
            inactive=[wid for wid in wids if states.get(wid) in _INACTIVE],
        )

    # ---- workers: queries

    @_op
    def list_workers(
        self,
        state: WorkerState | Iterable[WorkerState] | None = None,
        tags: Iterable[str] | None = None,
        min_cpus: int | None = None,
        min_memory_bytes: int | None = None,
        name: str | None = None,
    ) -> list[WorkerRecord]:
        """Workers matching every given filter, ordered by first_seen then id.

        The order is stable, so "worker N of the list" keeps meaning the same worker.
        ``tags``: the worker must carry all of them.
        """
        query = Worker.select().order_by(Worker.first_seen, Worker.id)
        if state is not None:
            states = [state] if isinstance(state, (WorkerState, str)) else list(state)
            query = query.where(Worker.state.in_([WorkerState(s).value for s in states]))
        if min_cpus is not None:
            query = query.where(Worker.cpus >= min_cpus)
        if min_memory_bytes is not None:
            query = query.where(Worker.memory_bytes >= min_memory_bytes)
        if name is not None:
            query = query.where(Worker.name == name)
        records = [_worker_record(row) for row in _dicts(query)]
        wanted = set(tags or ())
        return [r for r in records if wanted.issubset(r.tags)] if wanted else records

    @_op
    def get_worker(self, id_or_name: str) -> WorkerRecord | None:
        """The worker with this id, else the only worker with this name; None otherwise."""
        rows = _dicts(Worker.select().where(Worker.id == id_or_name))
        if not rows:
            rows = _dicts(Worker.select().where(Worker.name == id_or_name).limit(2))
            if len(rows) > 1:
                log.debug("worker name %r is ambiguous", id_or_name)
                return None
        return _worker_record(rows[0]) if rows else None

    @_op
    def live_worker_deadlines(self) -> list[tuple[str, float, float]]:
        """``(wid, last_seen, heartbeat_interval)`` of ONLINE/DRAINING workers.

        A restarted coordinator rebuilds its liveness timers from these.
        """
        query = (
            Worker.select(Worker.id, Worker.last_seen, Worker.heartbeat_interval)
            .where(Worker.state.in_([s.value for s in LIVE_STATES]))
            .order_by(Worker.id)
        )
        return [(wid, last_seen, interval) for wid, last_seen, interval in _tuples(query)]

    @_op
    def worker_events(self, wid: str, limit: int = 100) -> list[WorkerEventRecord]:
        """The worker's latest ``limit`` transitions, newest first."""
        query = (
            WorkerEvent.select()
            .where(WorkerEvent.worker_id == wid)
            .order_by(WorkerEvent.id.desc())
            .limit(max(0, limit))
        )
        return [
            WorkerEventRecord(
                id=row.id,
                worker_id=row.worker_id,
                ts=row.ts,
                old_state=WorkerState(row.old_state) if row.old_state else None,
                new_state=WorkerState(row.new_state),
                reason=row.reason,
            )
            for row in query
        ]


    # ---- names

    @_op
    def worker_names(self, wids: Iterable[str]) -> dict[str, str]:
        """``{wid: name}`` of the known workers among ``wids`` (for listings)."""
        names: dict[str, str] = {}
        for chunk in _chunks(list(dict.fromkeys(wids)), IN_CHUNK):
            query = Worker.select(Worker.id, Worker.name).where(Worker.id.in_(list(chunk)))
            names.update(_tuples(query))
        return names

    # ---- reservations

    @_op
    def create_reservation(
        self,
        *,
        rid: str,
        worker_id: str,
        client_id: str,
        lease_s: float,
        now: float,
        session: str = "",
        image: str | None = None,
        executor: str | None = None,
        max_per_client: int = 1,
        worker_states: Iterable[WorkerState] = (WorkerState.ONLINE,),
    ) -> ReservationRecord:
        """Record a reservation in state OPENING, or refuse it; nothing changes on refusal.

        In one transaction: the worker must exist (NotFound) and be in ``worker_states``
        (WorkerNotReservable; its row is locked, so a concurrent state change lands
        either before this check or after the insert, where the state listener sees the
        reservation); the client must hold fewer than ``max_per_client`` live
        reservations (ReservationLimitReached; 0 = no limit); the insert fills the unique
        ``active_worker``, so of racing requests for one worker exactly one commits and
        the others get WorkerAlreadyReserved.
        """
        _text(rid, "reservation id", RID_MAX)
        _text(worker_id, "worker id", ID_MAX)
        _text(client_id, "client id", ID_MAX)
        if not isinstance(session, str) or len(session) > ID_MAX:
            raise InvalidArgument(f"session must be a string of at most {ID_MAX} characters")
        if image is not None:
            _text(image, "image", IMAGE_MAX)
        if executor is not None:
            _text(executor, "executor", SHORT_MAX)
        lease = _float(lease_s)
        if lease is None or lease <= 0:
            raise InvalidArgument(f"lease must be a positive number of seconds, got {lease_s!r}")
        allowed = {WorkerState(s).value for s in worker_states}
        row = {
            "id": rid,
            "worker_id": worker_id,
            "client_id": client_id,
            "session": session,
            "state": ReservationState.OPENING.value,
            "created_at": now,
            "expires_at": now + lease,
            "lease_s": lease,
            "ended_at": None,
            "ended_reason": "",
            "image": image,
            "executor": executor,
            "active_worker": worker_id,
            "client_gone_at": None,
        }
        try:
            with self.db.atomic():
                # MySQL: one reserve at a time per client, so the limit holds under races
                # (SQLite's BEGIN IMMEDIATE already serialises every writer).
                list(self._for_update(Principal.select(Principal.id).where(
                    Principal.id == client_id)).tuples())
                worker = self._locked_worker(worker_id)
                if worker is None:
                    raise NotFound(f"no worker with id or name {worker_id!r}")
                if worker["state"] not in allowed:
                    raise WorkerNotReservable(worker_id, worker["state"])
                if max_per_client > 0:
                    held = _tuples(
                        Reservation.select(Reservation.id, Reservation.worker_id)
                        .where((Reservation.client_id == client_id)
                               & Reservation.state.in_(_LIVE_RESERVATION_VALUES))
                        .order_by(Reservation.created_at)
                    )
                    if len(held) >= max_per_client:
                        raise ReservationLimitReached(client_id, [(r, w) for r, w in held])
                Reservation.insert(row).execute()
        except IntegrityError:
            if Reservation.get_or_none(Reservation.id == rid) is not None:
                raise AlreadyExists(f"reservation id {rid!r} is taken") from None
            raise WorkerAlreadyReserved(worker_id) from None
        log.info("reservation %s: %s reserves worker %s (opening)", rid, client_id, worker_id)
        row.pop("active_worker")
        return _reservation_record(row)

    def _reservation(self, rid: str) -> ReservationRecord | None:
        rows = _dicts(Reservation.select().where(Reservation.id == rid))
        return _reservation_record(rows[0]) if rows else None

    @_op
    def get_reservation(self, rid: str) -> ReservationRecord | None:
        """The reservation with this id, live or ended; None if unknown."""
        return self._reservation(rid)

    @_op
    def activate_reservation(self, rid: str, now: float) -> ReservationRecord | None:
        """OPENING -> ACTIVE with the lease starting ``now``; None if it was not opening."""
        with self.db.atomic():
            changed = (
                Reservation.update(state=ReservationState.ACTIVE.value,
                                   expires_at=Reservation.lease_s + now)
                .where((Reservation.id == rid)
                       & Reservation.state.in_(_values(sources_of(ReservationState.ACTIVE))))
                .execute()
            )
            return self._reservation(rid) if changed else None

    @_op
    def renew_reservation(self, rid: str, now: float) -> ReservationRecord | None:
        """Extend an ACTIVE lease to ``now + lease_s``; None if it is not active.

        A renewal proves the holder is alive, so it also clears a pending client.gone.
        """
        with self.db.atomic():
            changed = (
                Reservation.update(expires_at=Reservation.lease_s + now, client_gone_at=None)
                .where((Reservation.id == rid)
                       & (Reservation.state == ReservationState.ACTIVE.value))
                .execute()
            )
            return self._reservation(rid) if changed else None

    @_op
    def end_reservation(
        self, rid: str, reason: str, now: float, *, expired_by: float | None = None
    ) -> tuple[ReservationState, ReservationRecord] | None:
        """End a live reservation and free its worker: ``(previous state, ended record)``.

        None when it was not live (or, with ``expired_by``, when its lease had not run out
        by then: a renewal that won the race keeps it). The row is locked and the update
        conditional, so when several causes race (lease, worker lost, release) exactly one
        call gets the record back, and only that caller notifies anyone.
        """
        live = _values(sources_of(ReservationState.ENDED))
        with self.db.atomic():
            query = Reservation.select(Reservation.state, Reservation.expires_at).where(
                Reservation.id == rid)
            rows = _tuples(self._for_update(query))
            if not rows or rows[0][0] not in live:
                return None
            if expired_by is not None and rows[0][1] > expired_by:
                return None
            Reservation.update(
                state=ReservationState.ENDED.value, ended_at=now,
                ended_reason=(reason or "ended")[:REASON_MAX], active_worker=None,
                client_gone_at=None,
            ).where((Reservation.id == rid) & Reservation.state.in_(live)).execute()
            record = self._reservation(rid)
        assert record is not None
        log.info("reservation %s on %s ended: %s", rid, record.worker_id, reason)
        return ReservationState(rows[0][0]), record

    @_op
    def list_reservations(
        self,
        *,
        client_id: str | None = None,
        worker_id: str | None = None,
        session: str | None = None,
        states: Iterable[ReservationState] | None = None,
        client_gone: bool | None = None,
        limit: int | None = None,
    ) -> list[ReservationRecord]:
        """Reservations matching every given filter, newest first."""
        query = Reservation.select().order_by(Reservation.created_at.desc(),
                                              Reservation.id.desc())
        if client_id is not None:
            query = query.where(Reservation.client_id == client_id)
        if worker_id is not None:
            query = query.where(Reservation.worker_id == worker_id)
        if session is not None:
            query = query.where(Reservation.session == session)
        if states is not None:
            query = query.where(Reservation.state.in_(_values(states)))
        if client_gone is not None:
            gone = Reservation.client_gone_at.is_null(False)
            query = query.where(gone if client_gone else ~gone)
        if limit is not None:
            query = query.limit(max(0, limit))
        return [_reservation_record(row) for row in _dicts(query)]

    @_op
    def reservation_of_worker(self, wid: str) -> ReservationRecord | None:
        """The live reservation holding ``wid``, if any."""
        rows = _dicts(Reservation.select().where(Reservation.active_worker == wid))
        return _reservation_record(rows[0]) if rows else None

    @_op
    def reserved_worker_ids(self) -> set[str]:
        """Ids of the workers held by a live reservation."""
        query = Reservation.select(Reservation.active_worker).where(
            Reservation.active_worker.is_null(False))
        return {wid for (wid,) in _tuples(query)}

    @_op
    def mark_client_gone(
        self, client_id: str, session: str, at: float | None
    ) -> list[ReservationRecord]:
        """Note (``at``) or clear (None) a client.gone on the live reservations of a session.

        Persisted so that a restarted coordinator rebuilds the grace timers. Returns the
        live reservations of that client session.
        """
        live = (Reservation.client_id == client_id) & (Reservation.session == session) & (
            Reservation.state.in_(_LIVE_RESERVATION_VALUES))
        with self.db.atomic():
            Reservation.update(client_gone_at=at).where(live).execute()
            rows = _dicts(Reservation.select().where(live).order_by(Reservation.created_at))
        return [_reservation_record(row) for row in rows]

    # ---- exec audit

    @_op
    def record_exec_audits(self, rows: Sequence[dict[str, Any]]) -> int:
        """Store many audit records in one transaction (redelivered ones are skipped).

        Each row holds the keyword arguments of ``_audit_row``; returns how many rows
        were offered. The coordinator's audit writer batches reports through this.
        """
        clean = [_audit_row(**row) for row in rows]
        if not clean:
            return 0
        with self.db.atomic():
            for chunk in _chunks(clean, 200):
                ExecAudit.insert_many(list(chunk)).on_conflict_ignore().execute()
        return len(clean)

    @_op
    def list_exec_audit(
        self,
        *,
        client_id: str | None = None,
        worker_id: str | None = None,
        reservation_id: str | None = None,
        limit: int = 100,
    ) -> list[ExecAuditRecord]:
        """Audit records matching every given filter, newest first."""
        query = ExecAudit.select().order_by(ExecAudit.id.desc()).limit(max(0, limit))
        if client_id is not None:
            query = query.where(ExecAudit.client_id == client_id)
        if worker_id is not None:
            query = query.where(ExecAudit.worker_id == worker_id)
        if reservation_id is not None:
            query = query.where(ExecAudit.reservation_id == reservation_id)
        return [_audit_record(row) for row in _dicts(query)]


def _values(states: Iterable[ReservationState]) -> list[str]:
    return sorted(ReservationState(s).value for s in states)


def _now(now: float | None) -> float:
    return time.time() if now is None else now


class _HeartbeatSQL:
    """Hand-written bulk SQL for heartbeat ingest: peewee's per-row query building is the
    bottleneck at tens of thousands of rows per second.

    Samples: one prepared INSERT run with ``executemany`` (SQLite runs it in C; PyMySQL
    rewrites it into multi-row INSERTs capped at ~1 MB, below max_allowed_packet).
    Worker rows: SQLite ``executemany`` of one UPDATE; MySQL one ``UPDATE ... JOIN`` over a
    derived table per chunk, since PyMySQL would send UPDATEs one round trip each.
    """

    SAMPLE_COLUMNS = (
        "worker_id",
        "ts",
        "cpu_percent",
        "load1",
        "mem_used_bytes",
        "mem_available_bytes",
        "disk_free_bytes",
        "net_sent_bytes",
        "net_recv_bytes",
        "running",
    )
    SET = ("last_seen", "last_heartbeat_at", "last_metrics")
    KEEP_IF_NULL = ("free_slots", "heartbeat_seq", "heartbeat_interval")

    def __init__(self, db: Database, backend: str) -> None:
        self.backend = backend
        self._quote = db.quote
        p = db.param
        sample_table = self._q(WorkerSample._meta.table_name)
        self.insert_samples = (
            f"INSERT INTO {sample_table} ({', '.join(map(self._q, self.SAMPLE_COLUMNS))}) "
            f"VALUES ({', '.join([p] * len(self.SAMPLE_COLUMNS))})"
        )
        worker = self._q(Worker._meta.table_name)
        sets = [f"{self._q(c)} = {p}" for c in self.SET]
        sets += [f"{self._q(c)} = COALESCE({p}, {self._q(c)})" for c in self.KEEP_IF_NULL]
        self.update_worker = f"UPDATE {worker} SET {', '.join(sets)} WHERE {self._q('id')} = {p}"
        self.worker_table = worker
        self._select_states = f"SELECT {self._q('id')}, {self._q('state')} FROM {worker} WHERE "
        self._param = p

    def states_of(self, db: Database, wids: Sequence[str]) -> dict[str, str]:
        """``{wid: state}`` of the known workers among ``wids``."""
        states: dict[str, str] = {}
        for chunk in _chunks(wids, IN_CHUNK):
            marks = ", ".join([self._param] * len(chunk))
            cursor = db.execute_sql(f"{self._select_states}{self._q('id')} IN ({marks})", chunk)
            states.update(cursor.fetchall())
        return states

    def write(
        self, db: Database, samples: list[tuple[Any, ...]], updates: list[tuple[Any, ...]]
    ) -> None:
        """Insert ``samples`` and apply ``updates``; call inside a transaction."""
        cursor = db.cursor()
        try:
            if samples:
                cursor.executemany(self.insert_samples, samples)
            if not updates:
                return
            if self.backend == "sqlite":
                cursor.executemany(self.update_worker, updates)
            else:
                for chunk in self._mysql_chunks(updates):
                    cursor.execute(
                        self._mysql_update_sql(len(chunk)), [v for row in chunk for v in row]
                    )
        finally:
            cursor.close()

    def _mysql_chunks(self, updates: list[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
        chunk: list[tuple[Any, ...]] = []
        size = 0
        for row in updates:
            chunk.append(row)
            size += len(row[2]) + 200
            if len(chunk) >= MYSQL_UPDATE_ROWS or size >= MYSQL_UPDATE_BYTES:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    def _q(self, name: str) -> str:
        return f"{self._quote[0]}{name}{self._quote[1]}"

    def _mysql_update_sql(self, rows: int) -> str:
        """``UPDATE worker JOIN (SELECT .. UNION ALL SELECT ..) v`` for ``rows`` rows."""
        names = [*self.SET, *self.KEEP_IF_NULL, "id"]
        first = "SELECT " + ", ".join(f"%s AS {self._q(n)}" for n in names)
        rest = " UNION ALL SELECT " + ", ".join(["%s"] * len(names))
        derived = first + rest * (rows - 1)
        sets = [f"w.{self._q(c)} = v.{self._q(c)}" for c in self.SET]
        sets += [
            f"w.{self._q(c)} = COALESCE(v.{self._q(c)}, w.{self._q(c)})" for c in self.KEEP_IF_NULL
        ]
        join = f"JOIN ({derived}) AS v ON w.{self._q('id')} = v.{self._q('id')}"
        return f"UPDATE {self.worker_table} AS w {join} SET {', '.join(sets)}"
