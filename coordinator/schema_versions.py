"""The schema as of each version: the model snapshots and steps that coordinator/migrations.py
applies in order (``MIGRATIONS``). Each step creates what its version added, from its own
snapshot, never from the live models of ``coordinator.models``: those keep evolving, and
version 1 must create the same tables forever.
"""

from __future__ import annotations

from typing import Any

from peewee import (
    SQL,
    BigAutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    CompositeKey,
    Database,
    DoubleField,
    IntegerField,
    Model,
    MySQLDatabase,
    SqliteDatabase,
    TextField,
)


def table_meta(db: Database, table: str, **extra: Any) -> type:
    """A ``Meta`` for snapshot models: bound to ``db``, utf8mb4 + binary collation on MySQL.

    Binary collation keeps id comparisons case-sensitive, as they are on SQLite.
    """
    settings = (
        ["ENGINE=InnoDB", "DEFAULT CHARSET=utf8mb4", "COLLATE=utf8mb4_bin"]
        if isinstance(db, MySQLDatabase)
        else []
    )
    attrs = {
        "database": db,
        "table_name": table,
        "table_settings": settings,
        "legacy_table_names": False,  # index names derive from the table: xc_worker_state
        **extra,
    }
    return type("Meta", (), attrs)


class _MediumText(TextField):
    field_type = "MEDIUMTEXT"


def _v1_models(db: Database) -> list[type[Model]]:
    """Snapshot of the version-1 tables: principals, workers, heartbeat samples, events."""

    def model(name: str, table: str, fields: dict[str, Any], **meta: Any) -> type[Model]:
        attrs: dict[str, Any] = {**fields, "Meta": table_meta(db, table, **meta),
                                 "__module__": __name__}
        return type(name, (Model,), attrs)

    principal = model(
        "V1Principal",
        "xc_principal",
        {
            "id": CharField(128, primary_key=True),
            "role": CharField(16),
            "token_hash": CharField(255),
            "created_at": DoubleField(),
            "revoked_at": DoubleField(null=True),
            "note": TextField(default=""),
        },
    )
    worker = model(
        "V1Worker",
        "xc_worker",
        {
            "id": CharField(128, primary_key=True),
            "name": CharField(128, index=True),
            "state": CharField(16, index=True),
            "state_reason": TextField(default=""),
            "state_changed_at": DoubleField(),
            "description": TextField(default=""),
            "tags": _MediumText(default="[]"),
            "caps": _MediumText(default="{}"),
            "cpus": IntegerField(default=0),
            "memory_bytes": BigIntegerField(default=0),
            "os": CharField(64, default=""),
            "arch": CharField(64, default=""),
            "executors": _MediumText(default="[]"),
            "slots": IntegerField(default=1),
            "free_slots": IntegerField(default=1),
            "heartbeat_interval": DoubleField(),
            "first_seen": DoubleField(),
            "last_seen": DoubleField(index=True),
            "last_heartbeat_at": DoubleField(null=True),
            "last_metrics": _MediumText(default="{}"),
            "heartbeat_seq": BigIntegerField(default=0),
        },
    )
    sample = model(
        "V1WorkerSample",
        "xc_worker_sample",
        {
            "id": BigAutoField(),
            "worker_id": CharField(128),
            "ts": DoubleField(),
            "cpu_percent": DoubleField(null=True),
            "load1": DoubleField(null=True),
            "mem_used_bytes": BigIntegerField(null=True),
            "mem_available_bytes": BigIntegerField(null=True),
            "disk_free_bytes": BigIntegerField(null=True),
            "net_sent_bytes": BigIntegerField(null=True),
            "net_recv_bytes": BigIntegerField(null=True),
            "running": IntegerField(default=0),
        },
        indexes=((("worker_id", "ts"), False),),
    )
    event = model(
        "V1WorkerEvent",
        "xc_worker_event",
        {
            "id": BigAutoField(),
            "worker_id": CharField(128, index=True),
            "ts": DoubleField(),
            "old_state": CharField(16, null=True),
            "new_state": CharField(16),
            "reason": TextField(default=""),
        },
    )
    return [principal, worker, sample, event]


def v1_initial(db: Database) -> None:
    db.create_tables(_v1_models(db), safe=True)


def _v2_models(db: Database) -> list[type[Model]]:
    """Snapshot of the tables version 2 adds: reservations and the exec audit trail.

    ``xc_reservation.active_worker`` is UNIQUE: it holds the worker id while the
    reservation is live and NULL afterwards, so the database itself refuses a second
    holder of a worker, whatever races between requests or coordinators.
    """

    def model(name: str, table: str, fields: dict[str, Any], **meta: Any) -> type[Model]:
        attrs: dict[str, Any] = {**fields, "Meta": table_meta(db, table, **meta),
                                 "__module__": __name__}
        return type(name, (Model,), attrs)

    reservation = model(
        "V2Reservation",
        "xc_reservation",
        {
            "id": CharField(64, primary_key=True),
            "worker_id": CharField(128, index=True),
            "client_id": CharField(128, index=True),
            "session": CharField(128, default=""),
            "state": CharField(16, index=True),
            "created_at": DoubleField(),
            "expires_at": DoubleField(),
            "lease_s": DoubleField(),
            "ended_at": DoubleField(null=True),
            "ended_reason": TextField(default=""),
            "image": CharField(256, null=True),
            "executor": CharField(64, null=True),
            "active_worker": CharField(128, null=True, unique=True),
            "client_gone_at": DoubleField(null=True),
        },
    )
    audit = model(
        "V2ExecAudit",
        "xc_exec_audit",
        {
            "id": BigAutoField(),
            "reservation_id": CharField(64),
            "worker_id": CharField(128, index=True),
            "client_id": CharField(128, index=True),
            "exec_id": CharField(64),
            "command": _MediumText(),
            "mode": CharField(16, null=True),
            "started_at": DoubleField(),
            "duration_s": DoubleField(null=True),
            "exit_code": IntegerField(null=True),
            "signal": IntegerField(null=True),
            "timed_out": BooleanField(null=True),
            "truncated": BooleanField(null=True),
            "oom_killed": BooleanField(null=True),
            "output_bytes": BigIntegerField(null=True),
            "error": TextField(null=True),
            "reported_at": DoubleField(),
        },
        indexes=((("reservation_id", "exec_id"), True),),
    )
    return [reservation, audit]


def v2_reservations(db: Database) -> None:
    db.create_tables(_v2_models(db), safe=True)


def _v3_models(db: Database) -> list[type[Model]]:
    """Snapshot of the tables version 3 adds: downsampled worker metrics, grid-wide
    series and the roll-up cursors (coordinator/monitoring, docs/monitoring.md)."""

    def model(name: str, table: str, fields: dict[str, Any], **meta: Any) -> type[Model]:
        attrs: dict[str, Any] = {**fields, "Meta": table_meta(db, table, **meta),
                                 "__module__": __name__}
        return type(name, (Model,), attrs)

    # SQLite: the rows live in their primary key's B-tree (no separate rowid table), which
    # halves what the largest monitoring table takes on disk. InnoDB clusters by the key.
    clustered = {"without_rowid": True} if isinstance(db, SqliteDatabase) else {}

    def stat(*names: str, counts: tuple[str, ...] = ()) -> dict[str, Any]:
        fields: dict[str, Any] = {c: IntegerField(default=0) for c in counts}
        for name in names:
            if name.endswith("_sum"):
                fields[name] = DoubleField(default=0)
            else:
                fields[name] = DoubleField(null=True)
        return fields

    worker_metric = model(
        "V3WorkerMetric",
        "xc_worker_metric",
        {
            "worker_id": CharField(128),
            "res": IntegerField(),
            "ts": BigIntegerField(),
            "n": IntegerField(default=0),
            **stat("cpu_min", "cpu_sum", "cpu_max", "mem_min", "mem_sum", "mem_max"),
            **stat("load_sum", "load_max", counts=("load_n",)),
            **stat("disk_min"),
            **stat("rx_sum", "rx_max", "tx_sum", "tx_max", counts=("net_n",)),
            **stat("gpu_sum", "gpu_max", "gpu_mem_sum", "gpu_mem_max", counts=("gpu_n",)),
            "run_max": IntegerField(null=True),
        },
        primary_key=CompositeKey("worker_id", "res", "ts"),
        indexes=((("res", "ts"), False),),
        **clustered,
    )
    grid_metric = model(
        "V3GridMetric",
        "xc_grid_metric",
        {
            "series": CharField(64),
            "res": IntegerField(),
            "ts": BigIntegerField(),
            "n": IntegerField(default=0),
            "sum": DoubleField(default=0),
            "min": DoubleField(null=True),
            "max": DoubleField(null=True),
        },
        primary_key=CompositeKey("series", "res", "ts"),
        indexes=((("res", "ts"), False),),
        **clustered,
    )
    cursor = model(
        "V3MetricCursor",
        "xc_metric_cursor",
        {
            "name": CharField(64, primary_key=True),
            "value": DoubleField(),
            "updated_at": DoubleField(),
        },
    )
    return [worker_metric, grid_metric, cursor]


def v3_metrics(db: Database) -> None:
    db.create_tables(_v3_models(db), safe=True)


def _v4_models(db: Database) -> list[type[Model]]:
    """Snapshot of the tables version 4 adds: content-addressed data objects, their
    names and references, and the records of incoming transfers (docs/data.md)."""

    def model(name: str, table: str, fields: dict[str, Any], **meta: Any) -> type[Model]:
        attrs: dict[str, Any] = {**fields, "Meta": table_meta(db, table, **meta),
                                 "__module__": __name__}
        return type(name, (Model,), attrs)

    data_object = model("V4DataObject", "xc_data_object", {
        "sha256": CharField(64, primary_key=True),
        "size": BigIntegerField(),
        "created_at": DoubleField(),
        "last_used_at": DoubleField(),
    })
    data_entry = model("V4DataEntry", "xc_data_entry", {
        "id": CharField(64, primary_key=True),
        "owner": CharField(128),
        "name": CharField(255),
        "sha256": CharField(64, index=True),
        "size": BigIntegerField(),
        "access": CharField(16, default="private"),
        "share": _MediumText(default="[]"),
        "created_at": DoubleField(),
        "last_used_at": DoubleField(),
        "expires_at": DoubleField(null=True, index=True),
    }, indexes=((("owner", "name"), True),))
    data_ref = model("V4DataRef", "xc_data_ref", {
        "sha256": CharField(64),
        "kind": CharField(16),
        "ref_id": CharField(128),
        "owner": CharField(128),
        "created_at": DoubleField(),
    }, primary_key=CompositeKey("sha256", "kind", "ref_id"))
    transfer = model("V4Transfer", "xc_transfer", {
        "peer": CharField(128),
        "tid": CharField(64),
        "peer_inbox": CharField(512),
        "direction": CharField(16),
        "name": CharField(255),
        "size": BigIntegerField(),
        "sha256": CharField(64),
        "segment_size": IntegerField(),
        "purpose": _MediumText(),
        "have": _MediumText(default="[]"),
        "phase": CharField(16, index=True),
        "ref": _MediumText(null=True),
        "created_at": DoubleField(),
        "updated_at": DoubleField(),
    }, primary_key=CompositeKey("peer", "tid"))
    return [data_object, data_entry, data_ref, transfer]


def v4_data(db: Database) -> None:
    db.create_tables(_v4_models(db), safe=True)


def _v5_models(db: Database) -> list[type[Model]]:
    """Snapshot of the table version 5 adds: registered applications (docs/data.md,
    "Applications"); the data they name are kept by ``xc_data_ref`` rows of kind app."""
    attrs: dict[str, Any] = {
        "id": CharField(64, primary_key=True),
        "owner": CharField(128),
        "name": CharField(128),
        "version": CharField(64),
        "kind": CharField(16),
        "spec": _MediumText(),
        "access": CharField(16, default="private"),
        "share": _MediumText(default="[]"),
        "created_at": DoubleField(),
        "Meta": table_meta(db, "xc_app", indexes=((("owner", "name", "version"), True),)),
        "__module__": __name__,
    }
    return [type("V5App", (Model,), attrs)]


def v5_apps(db: Database) -> None:
    db.create_tables(_v5_models(db), safe=True)


def _v6_models(db: Database) -> list[type[Model]]:
    """Snapshot of the tables version 6 adds: batch jobs, their attempts and the results
    the attempts reported (docs/jobs.md)."""

    def model(name: str, table: str, fields: dict[str, Any], **meta: Any) -> type[Model]:
        attrs: dict[str, Any] = {**fields, "Meta": table_meta(db, table, **meta),
                                 "__module__": __name__}
        return type(name, (Model,), attrs)

    job = model("V6Job", "xc_job", {
        "id": CharField(64, primary_key=True),
        "batch": CharField(64, index=True),
        "owner": CharField(128),
        "name": CharField(255, default=""),
        "state": CharField(16),
        "rank": IntegerField(default=0),
        "submitted_at": DoubleField(),
        "spec": _MediumText(),
        "cpus": IntegerField(default=1),
        "memory_bytes": BigIntegerField(default=0),
        "gpus": IntegerField(default=0),
        "replicas": IntegerField(default=1),
        "quorum": IntegerField(default=1),
        "after": _MediumText(default="[]"),
        "max_system_retries": IntegerField(default=3),
        "max_retries": IntegerField(default=0),
        "system_failures": IntegerField(default=0),
        "job_failures": IntegerField(default=0),
        "attempts": IntegerField(default=0),
        "current_attempt": CharField(64, null=True),
        "worker": CharField(128, null=True),
        "exit_code": IntegerField(null=True),
        "started_at": DoubleField(null=True),
        "ended_at": DoubleField(null=True),
        "hold_reason": CharField(1024, null=True),
        "hold_code": CharField(16, null=True),
        "hold_detail": _MediumText(null=True),
        "updated_at": DoubleField(),
    }, indexes=((("state", "rank", "submitted_at", "id"), False),
                (("owner", "submitted_at", "id"), False)))
    attempt = model("V6Attempt", "xc_attempt", {
        "id": CharField(64, primary_key=True),
        "job_id": CharField(64, index=True),
        "worker_id": CharField(128),
        "owner": CharField(128),
        "kind": CharField(16),
        "live": BooleanField(default=True),
        "assigned_at": DoubleField(),
        "acked_at": DoubleField(null=True),
        "started_at": DoubleField(null=True),
        "ended_at": DoubleField(null=True),
        "exit_code": IntegerField(null=True),
        "error": _MediumText(null=True),
        "cpus": IntegerField(default=1),
        "memory_bytes": BigIntegerField(default=0),
        "missing": IntegerField(default=0),
    }, indexes=((("live", "worker_id"), False),))
    result = model("V6JobResult", "xc_job_result", {
        "attempt_id": CharField(64, primary_key=True),
        "job_id": CharField(64, index=True),
        "worker_id": CharField(128),
        "kind": CharField(16),
        "counted": BooleanField(),
        "outcome": _MediumText(),
        "stdout": _MediumText(null=True),
        "stderr": _MediumText(null=True),
        "outputs": _MediumText(default="[]"),
        "started_at": DoubleField(null=True),
        "ended_at": DoubleField(null=True),
        "recorded_at": DoubleField(),
    })
    return [job, attempt, result]


def v6_jobs(db: Database) -> None:
    db.create_tables(_v6_models(db), safe=True)


def v7_job_deps(db: Database) -> None:
    """Job dependencies (docs/jobs.md, "Dependencies"): ``xc_job.waiting`` counts the
    parents not completed yet (the queue index leads with it, so the scheduler skips
    waiting jobs in the same index walk) and ``xc_job_edge`` finds a parent's children."""
    from playhouse.migrate import MySQLMigrator, SqliteMigrator
    from playhouse.migrate import migrate as run_migration

    migrator: Any = (MySQLMigrator(db) if isinstance(db, MySQLDatabase)
                     else SqliteMigrator(db))
    columns = {c.name for c in db.get_columns("xc_job")}
    indexes = {i.name for i in db.get_indexes("xc_job")}
    ops = []
    if "waiting" not in columns:
        # A database-side default too: rows inserted without the column wait for nothing.
        ops.append(migrator.add_column("xc_job", "waiting", IntegerField(
            default=0, constraints=[SQL("DEFAULT 0")])))
    if "xc_job_state_rank_submitted_at_id" in indexes:
        ops.append(migrator.drop_index("xc_job", "xc_job_state_rank_submitted_at_id"))
    if "xc_job_state_waiting_rank_submitted_at_id" not in indexes:
        ops.append(migrator.add_index(
            "xc_job", ("state", "waiting", "rank", "submitted_at", "id"), False))
    run_migration(*ops)
    if isinstance(db, MySQLDatabase):  # its NOT NULL step (MODIFY) dropped the default
        db.execute_sql("ALTER TABLE `xc_job` ALTER COLUMN `waiting` SET DEFAULT 0")
    attrs: dict[str, Any] = {
        "parent": CharField(64),
        "child": CharField(64),
        "Meta": table_meta(db, "xc_job_edge", primary_key=CompositeKey("parent", "child")),
        "__module__": __name__,
    }
    db.create_tables([type("V7JobEdge", (Model,), attrs)], safe=True)


def v8_worker_trust(db: Database) -> None:
    """Replicated jobs (docs/jobs.md, "Replicas and quorum"): each worker's replica results
    found valid and invalid by quorums. The replica columns of ``xc_job`` are version 6's."""
    attrs: dict[str, Any] = {
        "worker_id": CharField(128, primary_key=True),
        "valid": IntegerField(default=0),
        "invalid": IntegerField(default=0),
        "updated_at": DoubleField(),
        "Meta": table_meta(db, "xc_worker_trust"),
        "__module__": __name__,
    }
    db.create_tables([type("V8WorkerTrust", (Model,), attrs)], safe=True)


def v9_fair_share(db: Database) -> None:
    """Fair share (docs/jobs.md, "Fair share and locality"): the queue once more, with the
    owner after what makes a job schedulable, so each owner's queue head is one index
    range and the owners with queued work are found one index probe each."""
    from playhouse.migrate import MySQLMigrator, SqliteMigrator
    from playhouse.migrate import migrate as run_migration

    migrator: Any = (MySQLMigrator(db) if isinstance(db, MySQLDatabase)
                     else SqliteMigrator(db))
    if "xc_job_state_waiting_owner_rank_submitted_at_id" not in {
            i.name for i in db.get_indexes("xc_job")}:
        run_migration(migrator.add_index(
            "xc_job", ("state", "waiting", "owner", "rank", "submitted_at", "id"), False))


def v10_data_by_owner(db: Database) -> None:
    """Data names by content and owner: "does this owner name these bytes already" (every
    upload asks) was a scan of every name of the content, in Python: a sweep whose jobs
    all wrote the same output made each upload slower than the one before."""
    from playhouse.migrate import MySQLMigrator, SqliteMigrator
    from playhouse.migrate import migrate as run_migration

    migrator: Any = (MySQLMigrator(db) if isinstance(db, MySQLDatabase)
                     else SqliteMigrator(db))
    if "xc_data_entry_sha256_owner" not in {i.name for i in db.get_indexes("xc_data_entry")}:
        run_migration(migrator.add_index("xc_data_entry", ("sha256", "owner"), False))
