"""The database engine under the store: URLs, connection pools, sessions and error mapping.

``StoreBase`` is what every concept module of the store builds on: it owns the pooled
peewee database (``db``), the models bound to it (``models``, see
``coordinator.models.BoundModels``) and ``op``, the decorator that gives a public method a
pooled connection for its duration and turns database failures into ``StoreError``.

URLs: ``sqlite:///path.db`` (the embedded default; WAL) or
``mysql://user:pass@host:port/db`` (PyMySQL; the database is created if missing). Messages
name the URL with its password masked (``broker.config.mask_url``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Self, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import pymysql
from peewee import Database, DatabaseError, InterfaceError, OperationalError
from playhouse.pool import MaxConnectionsExceeded, PooledMySQLDatabase, PooledSqliteDatabase

from broker.config import mask_url
from coordinator import migrations
from coordinator.errors import CoordinatorError, StoreError
from coordinator.models import BoundModels
from coordinator.store.statements import Statements

log = logging.getLogger(__name__)

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
_MYSQL_DB_NAME = re.compile(r"^[A-Za-z0-9_$-]{1,64}$")
_ER_BAD_DB = 1049
_ER_ACCESS_DENIED = (1044, 1045, 1698)
UNAVAILABLE = (
    OperationalError,
    InterfaceError,
    MaxConnectionsExceeded,
    sqlite3.OperationalError,
    pymysql.err.OperationalError,
    pymysql.err.InterfaceError,
)
DB_ERRORS = (DatabaseError, sqlite3.Error, pymysql.err.Error)

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="StoreBase")


# --------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class Target:
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


def parse_url(url: str) -> Target:
    """``url`` checked and split, or a ``StoreError`` that says what a good URL looks like."""
    masked = mask_url(url)
    if not isinstance(url, str) or not url:
        raise StoreError(f"no database URL given; {_URL_HELP}")
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise StoreError(f"bad SQLite URL {masked!r}: {_URL_HELP}")
        path = url[len("sqlite:///") :]
        return Target(
            "sqlite", masked, path=path if path == ":memory:" else os.path.expanduser(path)
        )
    if url.startswith(("mysql://", "mariadb://")):
        return _parse_mysql(url, masked)
    raise StoreError(f"unsupported database URL {masked!r}: {_URL_HELP}")


def _parse_mysql(url: str, masked: str) -> Target:
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
    return Target(
        "mysql",
        masked,
        host=parts.hostname,
        port=port,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        database=database,
        connect_timeout=timeout,
    )


# --------------------------------------------------------------------------- pools


def open_database(target: Target) -> Database:
    """A pooled peewee database for ``target`` (not yet connected; MySQL: created if missing)."""
    return _sqlite_database(target) if target.backend == "sqlite" else _mysql_database(target)


def _sqlite_database(target: Target) -> Database:
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
    db: Database = SerialWriterSqliteDatabase(
        target.path,
        pragmas=list(SQLITE_PRAGMAS),
        lock_type="IMMEDIATE",  # writers take the lock up front: no deadlock on upgrade
        check_same_thread=False,  # pooled connections move between threads
        autoconnect=False,  # every access goes through StoreBase._session
        max_connections=1 if memory else POOL_SIZE,  # one connection = one in-memory DB
        timeout=POOL_WAIT_S,
    )
    return db


class SerialWriterSqliteDatabase(PooledSqliteDatabase):  # type: ignore[misc]
    """SQLite with this process's write transactions queued on a lock, not on SQLite.

    SQLite admits one writer; a second one waits in SQLite's busy handler, which sleeps
    1, 2, 5, 10 ms... between tries, so two threads writing at once (a report beside a
    scheduler pass) cost milliseconds each time. Here a writer waits on a lock that wakes
    it when the other commits. Transactions begin ``IMMEDIATE`` (all of them write-locks),
    and ``begin`` / ``commit`` / ``rollback`` bracket exactly the outermost ones.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writer = threading.Lock()
        self._holding = threading.local()

    def begin(self, lock_type: str | None = None) -> None:
        if not getattr(self._holding, "held", False):
            self._writer.acquire()
            self._holding.held = True
        try:
            super().begin(lock_type)
        except BaseException:
            self._release()
            raise

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._release()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release()

    def _release(self) -> None:
        if getattr(self._holding, "held", False):
            self._holding.held = False
            self._writer.release()

def _mysql_error(target: Target, err: Exception) -> StoreError:
    code = err.args[0] if err.args else None
    detail = str(err.args[1] if len(err.args) > 1 else err)
    if target.password:
        detail = detail.replace(target.password, "***")
    if code in _ER_ACCESS_DENIED:
        hint = "check the user and password in the URL and the user's grants"
    else:
        hint = "check that the server is running and the host and port are right"
    return StoreError(f"cannot open MySQL database {target.masked}: {detail}; {hint}")


def _ensure_mysql_database(target: Target) -> None:
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


def _mysql_database(target: Target) -> Database:
    _ensure_mysql_database(target)
    db: Database = PooledMySQLDatabase(
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
    return db


# --------------------------------------------------------------------------- sessions


def op(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Run a public store method with a pooled connection, mapping DB failures to StoreError.

    Every public method of the store wears it; the pools are ``autoconnect=False``, so a
    method without it fails at once in the tests.
    """

    @functools.wraps(method)
    def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._session():
            return method(self, *args, **kwargs)

    return run


class StoreBase:
    """One database: its pool, its bound models, its lifecycle. See ``coordinator.store``."""

    def __init__(self, db: Database, target: Target) -> None:
        """Prefer ``open``: it parses the URL, creates the pool and migrates."""
        self.db = db
        self.url = target.masked
        self.backend = target.backend
        self.models = BoundModels(db)
        self._closed = False
        # The hot paths' SQL, compiled once (coordinator/store/statements.py)
        self._sql = Statements(db, target.backend)

    @classmethod
    def open(cls, url: str) -> Self:
        """Open (creating if needed) and migrate the database at ``url``."""
        target = parse_url(url)
        db = open_database(target)
        store = cls(db, target)
        try:
            with db.connection_context():
                version = migrations.migrate(db)
        except (*DB_ERRORS, MaxConnectionsExceeded) as err:
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
        """Close every pooled connection (stop the callers first); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.db.close_all()  # type: ignore[attr-defined]  # pooled databases have it
        except DB_ERRORS as err:
            log.warning("closing %s: %s", self.url, err)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def held(self) -> Iterator[None]:
        """One pooled connection for every store call of this thread inside the block (a
        scheduler pass makes a dozen: one pool checkout, not one each); DB failures map to
        ``StoreError`` as in any store call. Each call still commits on its own."""
        with self._session():
            yield

    @contextmanager
    def _session(self) -> Iterator[None]:
        """A pooled connection for this thread (none taken when it holds one: ``held``),
        DB failures mapped to ``StoreError``."""
        if self._closed:
            raise StoreError(f"the store {self.url} is closed")
        try:
            if not self.db.is_closed():  # inside ``held`` (or an op) on this thread
                yield
                return
            with self.db.connection_context():
                yield
        except CoordinatorError:
            raise
        except UNAVAILABLE as err:
            raise StoreError(
                f"database {self.url} is unavailable: {err}; check that it is running and reachable"
            ) from err
        except DB_ERRORS as err:
            log.exception("database error on %s", self.url)
            raise StoreError(f"database error on {self.url}: {err}") from err

    @op
    def migrate(self) -> int:
        """Apply pending schema migrations; returns the schema version (idempotent)."""
        return migrations.migrate(self.db)

    def _for_update(self, query: Any) -> Any:
        """Lock selected rows until commit where the backend can (SQLite locks the file)."""
        return query.for_update() if self.backend == "mysql" else query
