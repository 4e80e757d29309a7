"""peewee models of the coordinator's database (the current schema).

These classes are never bound to a database: peewee keeps a model's database on its class,
so binding them would allow one database per process. Each ``Store`` instead calls
``BoundModels(db)``, which makes per-database subclasses (same fields, indexes and table
names) and queries through them (``store.models.Worker``). Any number of stores, on SQLite
or MySQL, can then live side by side in one process and its threads.

Conventions, for portability between SQLite and MySQL/MariaDB:
- timestamps are float epoch seconds (``DoubleField``);
- JSON documents are text holding JSON (``JsonTextField``; MEDIUMTEXT on MySQL, since
  capability documents with Docker image lists can outgrow TEXT's 64 KiB);
- every table is named ``xc_...``.

The schema here is the *current* one; ``coordinator/migrations.py`` owns how a database
gets there. Changing a model without adding a migration fails ``tests/test_store.py``.
Version 2 added reservations and the exec audit trail. To add a table: a model here,
appended to ``MODELS`` and annotated on ``BoundModels``, plus a migration (see
``coordinator.store``'s docstring for the whole recipe).
"""

from __future__ import annotations

from typing import TypeVar, cast

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
    TextField,
)

ID_MAX = 128  # worker and principal ids, names
STATE_MAX = 16
ROLE_MAX = 16
HASH_MAX = 255
SHORT_MAX = 64  # os, arch
RID_MAX = 64  # reservation ids, exec ids
IMAGE_MAX = 256  # container image references
SERIES_MAX = 64  # names of grid-wide series and roll-up cursors
SHA256_LEN = 64  # content addresses (hex)
DATA_NAME_MAX = 255  # data object names (xfer.init.json name)
TOPIC_MAX = 512  # a peer's inbox topic
APP_NAME_MAX = 128  # application names
APP_VERSION_MAX = 64  # application versions


class JsonTextField(TextField):
    """Text holding a JSON document; the store encodes and decodes it at its boundary."""

    field_type = "MEDIUMTEXT"  # SQLite: TEXT affinity; MySQL: up to 16 MiB


class MediumTextField(TextField):
    """Plain text that may exceed TEXT's 64 KiB on MySQL (a command of 64 Ki characters)."""

    field_type = "MEDIUMTEXT"


class BaseModel(Model):
    """Unbound base: each ``Store`` queries through its own subclasses (``BoundModels``)."""

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
    worker's row. The monitoring roll-up folds them into ``WorkerMetric`` buckets and
    deletes them after ``monitoring.raw_retention_s`` (docs/monitoring.md).
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


class Reservation(BaseModel):
    """One client's hold on one worker (schema version 2).

    ``active_worker`` equals ``worker_id`` while the reservation is not ended and is NULL
    afterwards. Its UNIQUE index is what makes "one holder per worker" true across racing
    requests and coordinator processes, on SQLite and MySQL alike (NULLs never collide).
    """

    id = CharField(RID_MAX, primary_key=True)
    worker_id = CharField(ID_MAX, index=True)
    client_id = CharField(ID_MAX, index=True)
    session = CharField(ID_MAX, default="")  # the client's connection id (client.gone)
    state = CharField(STATE_MAX, index=True)  # a ReservationState value
    created_at = DoubleField()
    expires_at = DoubleField()  # lease end; the grant's exp
    lease_s = DoubleField()
    ended_at = DoubleField(null=True)
    ended_reason = TextField(default="")
    image = CharField(IMAGE_MAX, null=True)
    executor = CharField(SHORT_MAX, null=True)
    active_worker = CharField(ID_MAX, null=True, unique=True)
    client_gone_at = DoubleField(null=True)  # client.gone seen, no client.hello since

    class Meta:
        table_name = "xc_reservation"


class ExecAudit(BaseModel):
    """Audit trail of remote commands, one row per ``exec.report`` (schema version 2).

    UNIQUE (reservation_id, exec_id): exec ids are unique per reservation, so a report
    redelivered by QoS 1 is stored once. That index also serves lookups by reservation.
    """

    id = BigAutoField()
    reservation_id = CharField(RID_MAX)
    worker_id = CharField(ID_MAX, index=True)
    client_id = CharField(ID_MAX, index=True)
    exec_id = CharField(RID_MAX)
    command = MediumTextField()
    mode = CharField(STATE_MAX, null=True)
    started_at = DoubleField()
    duration_s = DoubleField(null=True)
    exit_code = IntegerField(null=True)
    signal = IntegerField(null=True)
    timed_out = BooleanField(null=True)
    truncated = BooleanField(null=True)
    oom_killed = BooleanField(null=True)
    output_bytes = BigIntegerField(null=True)
    error = TextField(null=True)
    reported_at = DoubleField()

    class Meta:
        table_name = "xc_exec_audit"
        indexes = ((("reservation_id", "exec_id"), True),)


class WorkerMetric(BaseModel):
    """Downsampled heartbeat metrics: one row per worker, tier resolution and bucket
    (schema version 3; coordinator/monitoring, docs/monitoring.md).

    ``ts`` is the bucket's start (whole seconds, a multiple of ``res``). Sums and counts
    rather than averages, so a bucket still open can take more samples: the average is
    ``*_sum / n`` (``load``, ``net`` and ``gpu`` have their own counts, as heartbeats may
    lack them). Rates are bytes per second between consecutive heartbeats.
    """

    worker_id = CharField(ID_MAX)
    res = IntegerField()
    ts = BigIntegerField()
    n = IntegerField(default=0)
    cpu_min = DoubleField(null=True)
    cpu_sum = DoubleField(default=0)
    cpu_max = DoubleField(null=True)
    mem_min = DoubleField(null=True)
    mem_sum = DoubleField(default=0)
    mem_max = DoubleField(null=True)
    load_n = IntegerField(default=0)
    load_sum = DoubleField(default=0)
    load_max = DoubleField(null=True)
    disk_min = DoubleField(null=True)
    net_n = IntegerField(default=0)
    rx_sum = DoubleField(default=0)
    rx_max = DoubleField(null=True)
    tx_sum = DoubleField(default=0)
    tx_max = DoubleField(null=True)
    gpu_n = IntegerField(default=0)
    gpu_sum = DoubleField(default=0)
    gpu_max = DoubleField(null=True)
    gpu_mem_sum = DoubleField(default=0)
    gpu_mem_max = DoubleField(null=True)
    run_max = IntegerField(null=True)

    class Meta:
        table_name = "xc_worker_metric"
        primary_key = CompositeKey("worker_id", "res", "ts")
        indexes = ((("res", "ts"), False),)


class GridMetric(BaseModel):
    """Grid-wide series (workers by state, busy slots, reservations, ...), one row per
    series, resolution and bucket (schema version 3). ``sum / n`` is the average."""

    series = CharField(SERIES_MAX)
    res = IntegerField()
    ts = BigIntegerField()
    n = IntegerField(default=0)
    sum = DoubleField(default=0)
    min = DoubleField(null=True)
    max = DoubleField(null=True)

    class Meta:
        table_name = "xc_grid_metric"
        primary_key = CompositeKey("series", "res", "ts")
        indexes = ((("res", "ts"), False),)


class MetricCursor(BaseModel):
    """How far the roll-up got (schema version 3): the last raw sample id folded, the end
    of each tier's complete buckets. Moved with a compare-and-set, so two coordinators on
    one database never fold the same rows twice."""

    name = CharField(SERIES_MAX, primary_key=True)
    value = DoubleField()
    updated_at = DoubleField()

    class Meta:
        table_name = "xc_metric_cursor"


class DataObject(BaseModel):
    """The bytes of one content-addressed data object (schema version 4; docs/data.md).

    Keyed by the SHA-256 of the content; the bytes live on disk under
    ``<data_dir>/objects/ab/cd/<sha256>``, never here. An object is kept while a name
    (``DataEntry``) or a reference (``DataRef``) points at it.
    """

    sha256 = CharField(SHA256_LEN, primary_key=True)
    size = BigIntegerField()
    created_at = DoubleField()
    last_used_at = DoubleField()

    class Meta:
        table_name = "xc_data_object"


class DataEntry(BaseModel):
    """A name a principal gave to a data object, with its access rights (version 4).

    Names are unique per owner; hashes are global. ``share`` is a JSON list of principal
    ids (access ``shared``); ``expires_at`` lets garbage collection drop the name.
    """

    id = CharField(RID_MAX, primary_key=True)
    owner = CharField(ID_MAX)
    name = CharField(DATA_NAME_MAX)
    sha256 = CharField(SHA256_LEN, index=True)
    size = BigIntegerField()
    access = CharField(STATE_MAX, default="private")
    share = JsonTextField(default="[]")
    created_at = DoubleField()
    last_used_at = DoubleField()
    expires_at = DoubleField(null=True, index=True)

    class Meta:
        table_name = "xc_data_entry"
        # (sha256, owner): "does this owner name it" is one probe (version 10)
        indexes = ((("owner", "name"), True), (("sha256", "owner"), False))


class DataRef(BaseModel):
    """Something that keeps a data object alive (version 4): a pin (``ref_id`` = the
    principal), and later jobs and apps (``kind`` says which)."""

    sha256 = CharField(SHA256_LEN)
    kind = CharField(STATE_MAX)
    ref_id = CharField(ID_MAX)
    owner = CharField(ID_MAX)
    created_at = DoubleField()

    class Meta:
        table_name = "xc_data_ref"
        primary_key = CompositeKey("sha256", "kind", "ref_id")


class TransferRow(BaseModel):
    """The coordinator's record of one incoming transfer (version 4): the engine's
    ``TransferRecord`` (broker/transfer/state.py), keyed by ``(peer, tid)``. ``have``
    is updated alone on every acknowledgement (one cheap UPDATE)."""

    peer = CharField(ID_MAX)
    tid = CharField(RID_MAX)
    peer_inbox = CharField(TOPIC_MAX)
    direction = CharField(STATE_MAX)
    name = CharField(DATA_NAME_MAX)
    size = BigIntegerField()
    sha256 = CharField(SHA256_LEN)
    segment_size = IntegerField()
    purpose = JsonTextField()
    have = JsonTextField(default="[]")
    phase = CharField(STATE_MAX, index=True)
    ref = JsonTextField(null=True)
    created_at = DoubleField()
    updated_at = DoubleField()

    class Meta:
        table_name = "xc_transfer"
        primary_key = CompositeKey("peer", "tid")


class App(BaseModel):
    """A registered application version (docs/data.md, "Applications"): per-platform
    binaries, a Docker image, a ``docker save`` archive or a plain command. ``spec`` is
    JSON (``binaries``: platform -> {sha256, size}; ``image``; ``sha256``/``size``;
    ``command``); the data objects it names are kept by ``DataRef`` rows of kind ``app``
    (``ref_id`` = this id). Unique per (owner, name, version)."""

    id = CharField(RID_MAX, primary_key=True)
    owner = CharField(ID_MAX)
    name = CharField(APP_NAME_MAX)
    version = CharField(APP_VERSION_MAX)
    kind = CharField(STATE_MAX)
    spec = JsonTextField()
    access = CharField(STATE_MAX, default="private")
    share = JsonTextField(default="[]")
    created_at = DoubleField()

    class Meta:
        table_name = "xc_app"
        indexes = ((("owner", "name", "version"), True),)


class Job(BaseModel):
    """A batch job (version 6; docs/jobs.md): what to run (``spec``, the JobSpec as JSON)
    and where it stands. ``rank`` is ``-priority`` so that the scheduler's queue query
    (``state = queued AND waiting = 0 ORDER BY rank, submitted_at, id``) walks one
    ascending index on both backends. ``current_attempt`` is the fencing token: only that
    attempt may report. ``gpus`` and ``after``/``waiting`` (version 7: dependencies) are
    used; so are ``replicas``/``quorum`` (coordinator/job_replicas.py)."""

    id = CharField(RID_MAX, primary_key=True)
    batch = CharField(RID_MAX, index=True)
    owner = CharField(ID_MAX)
    name = CharField(DATA_NAME_MAX, default="")
    state = CharField(STATE_MAX)
    rank = IntegerField(default=0)
    submitted_at = DoubleField()
    spec = JsonTextField()
    cpus = IntegerField(default=1)
    memory_bytes = BigIntegerField(default=0)
    gpus = IntegerField(default=0)
    replicas = IntegerField(default=1)
    quorum = IntegerField(default=1)
    after = JsonTextField(default="[]")
    max_system_retries = IntegerField(default=3)
    max_retries = IntegerField(default=0)
    system_failures = IntegerField(default=0)
    job_failures = IntegerField(default=0)
    attempts = IntegerField(default=0)
    current_attempt = CharField(RID_MAX, null=True)
    worker = CharField(ID_MAX, null=True)
    exit_code = IntegerField(null=True)
    started_at = DoubleField(null=True)
    ended_at = DoubleField(null=True)
    hold_reason = CharField(1024, null=True)
    hold_code = CharField(STATE_MAX, null=True)
    hold_detail = MediumTextField(null=True)
    updated_at = DoubleField()
    # Parents (after) not completed yet (version 7): 0 is schedulable.
    waiting = IntegerField(default=0, constraints=[SQL("DEFAULT 0")])

    class Meta:
        table_name = "xc_job"
        indexes = (
            (("state", "waiting", "rank", "submitted_at", "id"), False),  # the scheduler's queue
            # each owner's queue (version 9: fair share, coordinator/fair_share.py)
            (("state", "waiting", "owner", "rank", "submitted_at", "id"), False),
            (("owner", "submitted_at", "id"), False),  # jobs.list
        )


class Attempt(BaseModel):
    """One try of a job on one worker (version 6). ``kind`` is its state while it lives
    (assigned, running) and how it ended after (coordinator/job_state.py). ``acked_at``:
    when the worker acknowledged job.assign; ``missing``: heartbeats in a row that did not
    list it."""

    id = CharField(RID_MAX, primary_key=True)
    job_id = CharField(RID_MAX, index=True)
    worker_id = CharField(ID_MAX)
    owner = CharField(ID_MAX)
    kind = CharField(STATE_MAX)
    live = BooleanField(default=True)
    assigned_at = DoubleField()
    acked_at = DoubleField(null=True)
    started_at = DoubleField(null=True)
    ended_at = DoubleField(null=True)
    exit_code = IntegerField(null=True)
    error = MediumTextField(null=True)
    cpus = IntegerField(default=1)
    memory_bytes = BigIntegerField(default=0)
    missing = IntegerField(default=0)

    class Meta:
        table_name = "xc_attempt"
        indexes = ((("live", "worker_id"), False),)


class JobResult(BaseModel):
    """The report of one attempt (version 6), recorded once: the primary key is the
    attempt id, so a re-sent report inserts nothing. ``counted`` is False for a stale
    attempt's report (recorded, ignored). ``stdout``/``stderr``/``outputs`` are JSON data
    refs; the objects are kept by ``xc_data_ref`` rows of kind job."""

    attempt_id = CharField(RID_MAX, primary_key=True)
    job_id = CharField(RID_MAX, index=True)
    worker_id = CharField(ID_MAX)
    kind = CharField(STATE_MAX)
    counted = BooleanField()
    outcome = JsonTextField()
    stdout = JsonTextField(null=True)
    stderr = JsonTextField(null=True)
    outputs = JsonTextField(default="[]")
    started_at = DoubleField(null=True)
    ended_at = DoubleField(null=True)
    recorded_at = DoubleField()

    class Meta:
        table_name = "xc_job_result"


class JobEdge(BaseModel):
    """``child`` runs after ``parent`` completes (version 7; docs/jobs.md, "Dependencies"):
    the primary key's prefix finds a parent's children when it ends."""

    parent = CharField(RID_MAX)
    child = CharField(RID_MAX)

    class Meta:
        table_name = "xc_job_edge"
        primary_key = CompositeKey("parent", "child")


class WorkerTrust(BaseModel):
    """A worker's replica results judged by quorums (version 8; coordinator/job_replicas.py):
    ``invalid`` >= 2 makes it untrusted."""

    worker_id = CharField(ID_MAX, primary_key=True)
    valid = IntegerField(default=0)
    invalid = IntegerField(default=0)
    updated_at = DoubleField()

    class Meta:
        table_name = "xc_worker_trust"


MODELS: list[type[BaseModel]] = [
    SchemaVersion,
    Principal,
    Worker,
    WorkerSample,
    WorkerEvent,
    Reservation,
    ExecAudit,
    WorkerMetric,
    GridMetric,
    MetricCursor,
    DataObject,
    DataEntry,
    DataRef,
    TransferRow,
    App,
    Job,
    Attempt,
    JobResult,
    JobEdge,
    WorkerTrust,
]


M = TypeVar("M", bound=BaseModel)


def _bound(model: type[M], db: Database) -> type[M]:
    """A subclass of ``model`` whose queries go to ``db`` (same fields, indexes, table)."""
    meta = type("Meta", (), {"database": db, "table_name": model._meta.table_name})
    attrs = {"Meta": meta, "__module__": __name__, "__qualname__": model.__qualname__}
    return cast("type[M]", type(model.__name__, (model,), attrs))


class BoundModels:
    """The models of ``MODELS``, bound to one database: ``store.models.Worker.select()``.

    An attribute per model, named as the model (a new model needs its line here too).
    """

    SchemaVersion: type[SchemaVersion]
    Principal: type[Principal]
    Worker: type[Worker]
    WorkerSample: type[WorkerSample]
    WorkerEvent: type[WorkerEvent]
    Reservation: type[Reservation]
    ExecAudit: type[ExecAudit]
    WorkerMetric: type[WorkerMetric]
    GridMetric: type[GridMetric]
    MetricCursor: type[MetricCursor]
    DataObject: type[DataObject]
    DataEntry: type[DataEntry]
    DataRef: type[DataRef]
    TransferRow: type[TransferRow]
    App: type[App]
    Job: type[Job]
    Attempt: type[Attempt]
    JobResult: type[JobResult]
    JobEdge: type[JobEdge]
    WorkerTrust: type[WorkerTrust]

    def __init__(self, db: Database) -> None:
        self.database = db
        self.all: list[type[BaseModel]] = [_bound(model, db) for model in MODELS]
        for model in self.all:
            setattr(self, model.__name__, model)
