"""Versioned schema migrations: how a database reaches the schema of ``coordinator.models``.

``MIGRATIONS`` is an ordered list of ``(version, name, apply)``. ``migrate(db)`` applies the
pending ones, each in its own transaction, and records each version in
``xc_schema_version``; it is idempotent, so the coordinator calls it on every start.

Each migration describes the schema *as of its version* (its own model snapshots or
``playhouse.migrate`` operations), never the live models in ``coordinator.models``: those
keep evolving and version 1 must create the same tables forever. To change the schema, add
a model change **and** a migration appending to ``MIGRATIONS``; a test compares the migrated
database with the models. The snapshots and steps themselves are in
coordinator/schema_versions.py.

MySQL/MariaDB commits DDL implicitly, so there a failed migration can leave part of its
tables behind; migrations therefore create with ``IF NOT EXISTS`` so a rerun completes
them. Concurrent starts (two coordinators) are serialised by ``GET_LOCK`` on MySQL and by
``BEGIN IMMEDIATE`` on SQLite.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from peewee import (
    Database,
    DoubleField,
    IntegerField,
    Model,
    MySQLDatabase,
    SqliteDatabase,
    fn,
)

from coordinator import schema_versions
from coordinator.errors import StoreError
from coordinator.schema_versions import table_meta

log = logging.getLogger(__name__)

VERSION_TABLE = "xc_schema_version"
LOCK_WAIT_S = 60


def _version_model(db: Database) -> type[Model]:
    """The schema-version table, as every version of the code knows it."""
    return type(
        "SchemaVersionRow",
        (Model,),
        {
            "version": IntegerField(primary_key=True),
            "applied_at": DoubleField(),
            "Meta": table_meta(db, VERSION_TABLE),
            "__module__": __name__,
        },
    )


Migration = tuple[int, str, Callable[[Database], None]]

MIGRATIONS: list[Migration] = [
    (1, "principals, workers, heartbeat samples, worker events", schema_versions.v1_initial),
    (2, "reservations, exec audit trail", schema_versions.v2_reservations),
    (3, "downsampled worker metrics, grid-wide series, roll-up cursors",
     schema_versions.v3_metrics),
    (4, "data objects, their names and references, incoming transfers", schema_versions.v4_data),
    (5, "applications", schema_versions.v5_apps),
    (6, "batch jobs, attempts, results", schema_versions.v6_jobs),
    (7, "job dependencies: waiting parents, job edges", schema_versions.v7_job_deps),
    (8, "replicated jobs: worker trust", schema_versions.v8_worker_trust),
    (9, "fair share: the queue index by owner", schema_versions.v9_fair_share),
    (10, "data names by content and owner", schema_versions.v10_data_by_owner),
]

LATEST_VERSION: int = MIGRATIONS[-1][0]


def current_version(db: Database) -> int:
    """The highest applied version; 0 for a database never migrated."""
    if VERSION_TABLE not in db.get_tables():
        return 0
    row: Any = _version_model(db)
    return int(row.select(fn.MAX(row.version)).scalar() or 0)


@contextmanager
def _exclusive(db: Database) -> Iterator[None]:
    """Serialise migrations across processes sharing a MySQL server (no-op for SQLite)."""
    if not isinstance(db, MySQLDatabase):
        yield
        return
    name = f"xcloud.migrate.{db.database}"[:64]
    got = db.execute_sql("SELECT GET_LOCK(%s, %s)", (name, LOCK_WAIT_S)).fetchone()[0]
    if got != 1:
        raise StoreError(
            f"another process has been migrating database {db.database!r} for "
            f"{LOCK_WAIT_S}s; wait for it to finish, then start again"
        )
    try:
        yield
    finally:
        db.execute_sql("SELECT RELEASE_LOCK(%s)", (name,))


def _transaction(db: Database) -> Any:
    """A write transaction; on SQLite take the write lock up front (BEGIN IMMEDIATE)."""
    if isinstance(db, SqliteDatabase):
        return db.atomic(lock_type="IMMEDIATE")
    return db.atomic()


def _check_not_newer(current: int, latest: int) -> None:
    if current > latest:
        raise StoreError(
            f"the database is at schema version {current} but this xcloud knows versions up "
            f"to {latest}: upgrade xcloud (or point it at another database)"
        )


def migrate(db: Database, migrations: list[Migration] | None = None) -> int:
    """Bring ``db`` to the latest schema version and return that version.

    Safe to call on every start: applied versions are skipped. Refuses (``StoreError``) a
    database newer than this code, rather than guess at a schema it does not know.
    """
    steps = MIGRATIONS if migrations is None else migrations
    row: Any = _version_model(db)
    with db.connection_context(), _exclusive(db):
        db.create_tables([row], safe=True)
        _check_not_newer(current_version(db), steps[-1][0])
        for version, name, apply in steps:
            with _transaction(db):
                if current_version(db) >= version:
                    continue
                log.info("applying schema migration %d: %s", version, name)
                apply(db)
                row.insert(version=version, applied_at=time.time()).execute()
        return current_version(db)
