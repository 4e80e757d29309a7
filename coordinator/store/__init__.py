"""The coordinator's memory: principals, workers, heartbeats, reservations and the exec
audit trail, in a database. ``Store`` is the one facade the rest of the code uses.

``Store.open(url)`` accepts ``sqlite:///path.db`` (the embedded default; WAL) or
``mysql://user:pass@host:port/db`` (PyMySQL; the database is created if missing) and
migrates the schema. Each Store queries through its own model classes
(``store.models``, see ``coordinator.models.BoundModels``), so any number of stores, on
any mix of backends, may be open in one process and used from any thread.

Layout, one module per concept, each with its records (frozen dataclasses, never model
instances: callers cannot lazily query, and the tables stay free to change):

- ``engine``: URL parsing, pools, SQLite pragmas, MySQL database creation, the
  ``op`` session decorator and the mapping of database failures to ``StoreError``
  (``StoreBase``, the base of every concept);
- ``principals``, ``workers``, ``heartbeats``, ``reservations``, ``audit``, ``metrics``
  (the stored time series): one mixin class each (``PrincipalStore``, ...), combined
  below into ``Store``;
- ``values``: checking and converting values at the boundary.
The wire format of records (the dicts of the ``*.reply`` messages) is
``coordinator.wire``, not here.

Threads: every public method checks a connection out of a small pool for its duration
and returns it (``op``), so any thread may call any method; connections are pinged on
check-out (MySQL) so a restarted server costs one failed call, not a wedged thread.
``sqlite:///:memory:`` (tests) has one connection, shared by the threads in turn.

Database failures surface as ``StoreError`` with the URL (password masked); domain errors
as ``NotFound``, ``AlreadyExists``, ``InvalidTransition`` and ``InvalidArgument``.

Adding a concept (say, jobs):
1. the model in ``coordinator/models.py``, appended to ``MODELS`` and annotated on
   ``BoundModels``; a migration appended to ``coordinator/migrations.py`` that creates
   the table from its own snapshot of the model;
2. ``coordinator/store/jobs.py``: the records (``JobRecord``) and ``class
   JobStore(StoreBase)`` whose public methods wear ``@op`` and query through
   ``self.models.Job``;
3. ``JobStore`` in ``Store``'s bases below, and its records in ``__all__``;
4. the records' wire dicts in ``coordinator/wire.py``; tests in tests/test_store.py;
   the table in docs/storage.md.
"""

from __future__ import annotations

from broker.config import mask_url
from coordinator.store.apps import AppRecord, AppStore
from coordinator.store.audit import AuditStore, ExecAuditRecord
from coordinator.store.data import DataObjectRecord, DataRecord, DataStore
from coordinator.store.engine import StoreBase
from coordinator.store.heartbeats import HeartbeatReport, HeartbeatStore
from coordinator.store.job_changes import JobChangeStore
from coordinator.store.job_queue import JobQueueStore
from coordinator.store.job_records import AttemptRecord, JobChange, JobRecord
from coordinator.store.job_replicas import ReplicaStore
from coordinator.store.job_rights import JobRightStore
from coordinator.store.jobs import JobStore
from coordinator.store.metrics import MetricsStore
from coordinator.store.principals import PrincipalRecord, PrincipalStore
from coordinator.store.reservations import ReservationRecord, ReservationStore
from coordinator.store.workers import (
    DEFAULT_HEARTBEAT_INTERVAL,
    WorkerEventRecord,
    WorkerRecord,
    WorkerStore,
)

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "AppRecord",
    "AttemptRecord",
    "DataObjectRecord",
    "DataRecord",
    "ExecAuditRecord",
    "HeartbeatReport",
    "JobChange",
    "JobRecord",
    "PrincipalRecord",
    "ReservationRecord",
    "Store",
    "StoreBase",
    "WorkerEventRecord",
    "WorkerRecord",
    "mask_url",
]


class Store(PrincipalStore, ReservationStore, WorkerStore, HeartbeatStore, AuditStore,
            MetricsStore, DataStore, AppStore, JobStore, JobChangeStore, JobQueueStore,
            ReplicaStore, JobRightStore):
    """The coordinator's database. Open with ``Store.open(url)``; close when done."""
