"""peewee models of the coordinator's database (the current schema).

The models are not bound to a database at import time: ``Store.open`` binds them to its
own database with ``db.bind(MODELS, ...)``. peewee keeps the binding on the model classes,
so the rule is **one open Store per process** (``Store.open`` refuses a second one).

Conventions, for portability between SQLite and MySQL/MariaDB:
- timestamps are float epoch seconds (``DoubleField``);
- JSON documents are text holding JSON (``JsonTextField``; MEDIUMTEXT on MySQL, since
  capability documents with Docker image lists can outgrow TEXT's 64 KiB);
- every table is named ``xc_...``.

The schema here is the *current* one; ``coordinator/migrations.py`` owns how a database
gets there. Changing a model without adding a migration fails ``tests/test_store.py``.
Later issues add tables (reservations, grants, exec audit, jobs, blobs) through new
migrations and new models appended to ``MODELS``.
"""

from __future__ import annotations

from peewee import (
    BigAutoField,
    BigIntegerField,
    CharField,
    DoubleField,
    IntegerField,
    Model,
    TextField,
)

ID_MAX = 128  # worker and principal ids, names
STATE_MAX = 16
ROLE_MAX = 16
HASH_MAX = 255
SHORT_MAX = 64  # os, arch


class JsonTextField(TextField):
    """Text holding a JSON document; the store encodes and decodes it at its boundary."""

    field_type = "MEDIUMTEXT"  # SQLite: TEXT affinity; MySQL: up to 16 MiB


class BaseModel(Model):
    """Unbound base: ``Store`` binds the models to its database when opened."""

    class Meta:
        database = None
        legacy_table_names = False


class SchemaVersion(BaseModel):
    """One row per applied migration; the schema version is the highest."""

    version = IntegerField(primary_key=True)
    applied_at = DoubleField()

    class Meta:
        table_name = "xc_schema_version"


class Principal(BaseModel):
    """Someone who may connect: a client, a worker or an admin, known by a token hash."""

    id = CharField(ID_MAX, primary_key=True)
    role = CharField(ROLE_MAX)
    token_hash = CharField(HASH_MAX)
    created_at = DoubleField()
    revoked_at = DoubleField(null=True)
    note = TextField(default="")

    class Meta:
        table_name = "xc_principal"


class Worker(BaseModel):
    """A worker as last described by its capabilities and heartbeats."""

    id = CharField(ID_MAX, primary_key=True)
    name = CharField(ID_MAX, index=True)
    state = CharField(STATE_MAX, index=True)  # a WorkerState value
    state_reason = TextField(default="")
    state_changed_at = DoubleField()
    description = TextField(default="")
    tags = JsonTextField(default="[]")  # JSON list of strings
    caps = JsonTextField(default="{}")  # the whole capability document
    cpus = IntegerField(default=0)
    memory_bytes = BigIntegerField(default=0)
    os = CharField(SHORT_MAX, default="")
    arch = CharField(SHORT_MAX, default="")
    executors = JsonTextField(default="[]")  # JSON list
    slots = IntegerField(default=1)
    free_slots = IntegerField(default=1)
    heartbeat_interval = DoubleField()
    first_seen = DoubleField()
    last_seen = DoubleField(index=True)  # any message from the worker
    last_heartbeat_at = DoubleField(null=True)
    last_metrics = JsonTextField(default="{}")  # latest heartbeat body
    heartbeat_seq = BigIntegerField(default=0)

    class Meta:
        table_name = "xc_worker"


class WorkerSample(BaseModel):
    """Raw heartbeat series, one row per heartbeat.

    No foreign key to ``xc_worker`` on purpose: inserts stay cheap and samples outlive a
    worker's row. Downsampling and retention arrive with the monitoring issue.
    """

    id = BigAutoField()
    worker_id = CharField(ID_MAX)
    ts = DoubleField()
    cpu_percent = DoubleField(null=True)
    load1 = DoubleField(null=True)
    mem_used_bytes = BigIntegerField(null=True)
    mem_available_bytes = BigIntegerField(null=True)
    disk_free_bytes = BigIntegerField(null=True)
    net_sent_bytes = BigIntegerField(null=True)
    net_recv_bytes = BigIntegerField(null=True)
    running = IntegerField(default=0)

    class Meta:
        table_name = "xc_worker_sample"
        indexes = ((("worker_id", "ts"), False),)


class WorkerEvent(BaseModel):
    """Audit trail: one row per worker state transition (``old_state`` NULL on first join)."""

    id = BigAutoField()
    worker_id = CharField(ID_MAX, index=True)
    ts = DoubleField()
    old_state = CharField(STATE_MAX, null=True)
    new_state = CharField(STATE_MAX)
    reason = TextField(default="")

    class Meta:
        table_name = "xc_worker_event"


MODELS: list[type[BaseModel]] = [SchemaVersion, Principal, Worker, WorkerSample, WorkerEvent]
