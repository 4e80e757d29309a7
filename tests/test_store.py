"""The coordinator's store, on SQLite and on MariaDB (every test runs on both backends).

MariaDB comes from ``tests/fixtures/services.py`` (``XCLOUD_TEST_MARIADB``, a fresh
database per test); when the server does not answer those cases skip, or fail under
``XCLOUD_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest
from peewee import Database

from coordinator import migrations, wire
from coordinator.errors import (
    AlreadyExists,
    CoordinatorError,
    InvalidArgument,
    InvalidTransition,
    NotFound,
    StoreError,
)
from coordinator.models import MODELS, BoundModels, Worker
from coordinator.reservation_state import ReservationState, WorkerAlreadyReserved
from coordinator.store import HeartbeatReport, Store, mask_url
from coordinator.worker_state import WorkerState
from schemas.outcome import Outcome
from tests.fixtures.services import MariaDBServer

T0 = 1_700_000_000.0
S = WorkerState


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A URL of an empty database: a SQLite file, or a fresh MariaDB database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state/xcloud.db"
    url: str = request.getfixturevalue("fresh_mariadb_url")
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store.open(db_url) as opened:
        yield opened


def caps(wid: str, **extra: Any) -> dict[str, Any]:
    """A capability document as a worker publishes it (schema worker.caps)."""
    doc: dict[str, Any] = {
        "wid": wid,
        "name": f"name-{wid}",
        "description": f"worker {wid}",
        "tags": ["linux"],
        "slots": 2,
        "executors": ["process"],
        "host": {"hostname": f"h-{wid}", "os": "Linux", "os_release": "6.1", "arch": "x86_64"},
        "cpu": {"count": 4, "physical": 2, "model": "x", "freq_mhz": 2000.0},
        "memory_bytes": 8 * 2**30,
        "disk_total_bytes": 10**12,
        "disk_free_bytes": 10**11,
        "docker": {"available": False, "version": None, "images": []},
        "shared": {"apps": [], "packages": [], "data": []},
        "agent_version": "0.1.0",
    }
    doc.update(extra)
    return doc


def beat(wid: str, seq: int, **extra: Any) -> dict[str, Any]:
    """A heartbeat body (schema worker.heartbeat)."""
    body: dict[str, Any] = {
        "wid": wid,
        "seq": seq,
        "interval_s": 2.0,
        "cpu_percent": 10.0 + seq,
        "load1": 0.5,
        "load5": 0.4,
        "load15": 0.3,
        "mem_used_bytes": 1000 + seq,
        "mem_available_bytes": 5000,
        "disk_free_bytes": 10**9,
        "net_sent_bytes": 10 * seq,
        "net_recv_bytes": 20 * seq,
        "running": [{"kind": "exec", "id": "e1"}],
        "free_slots": 1,
    }
    body.update(extra)
    return body


def samples_of(store: Store, wid: str) -> list[dict[str, Any]]:
    sample = store.models.WorkerSample
    with store.db.connection_context():
        query = sample.select().where(sample.worker_id == wid).order_by(sample.id)
        # peewee's stubs type .dicts() as returning the model query itself
        return cast(list[dict[str, Any]], list(query.dicts()))


# --------------------------------------------------------------------------- migrations


def test_fresh_database_is_migrated_to_latest(store: Store) -> None:
    with store.db.connection_context():
        assert migrations.current_version(store.db) == migrations.LATEST_VERSION
        tables = set(store.db.get_tables())
    assert {m._meta.table_name for m in MODELS} <= tables


def test_migrate_again_is_a_no_op(store: Store) -> None:
    store.upsert_worker_caps("w1", caps("w1"), T0)
    assert store.migrate() == migrations.LATEST_VERSION
    assert store.migrate() == migrations.LATEST_VERSION
    with store.db.connection_context():
        assert store.models.SchemaVersion.select().count() == len(migrations.MIGRATIONS)
    assert store.get_worker("w1") is not None


def test_migrated_schema_matches_models(store: Store) -> None:
    """A model changed without a migration (or the reverse) fails here."""
    db: Database = store.db
    with db.connection_context():
        for model in MODELS:
            table = model._meta.table_name
            columns = {c.name: c for c in db.get_columns(table)}
            fields = {f.column_name: f for f in model._meta.sorted_fields}
            assert set(columns) == set(fields), table
            for name, fld in fields.items():
                assert columns[name].null == fld.null, (table, name)
            indexed = {tuple(i.columns) for i in db.get_indexes(table)}
            for index in model._meta.fields_to_index():
                wanted = tuple(getattr(f, "column_name", str(f)) for f in index._expressions)
                assert wanted in indexed, (table, wanted)


def test_pending_migrations_apply_once(store: Store) -> None:
    calls: list[int] = []

    def v2(db: Database) -> None:
        calls.append(2)
        db.execute_sql("CREATE TABLE xc_test_v2 (id INTEGER PRIMARY KEY)")

    steps = [*migrations.MIGRATIONS, (migrations.LATEST_VERSION + 1, "test table", v2)]
    try:
        assert migrations.migrate(store.db, steps) == migrations.LATEST_VERSION + 1
        assert migrations.migrate(store.db, steps) == migrations.LATEST_VERSION + 1
        assert calls == [2]
    finally:
        with store.db.connection_context():
            store.db.execute_sql("DROP TABLE xc_test_v2")
            version = store.models.SchemaVersion
            version.delete().where(version.version > migrations.LATEST_VERSION).execute()


def test_newer_database_is_refused(db_url: str) -> None:
    with Store.open(db_url) as first, first.db.connection_context():
        first.models.SchemaVersion.insert(
            version=migrations.LATEST_VERSION + 7, applied_at=T0
        ).execute()
    with pytest.raises(StoreError, match=r"schema version \d+ .*upgrade xcloud"):
        Store.open(db_url)
    assert Worker._meta.database is None  # the declared models are never bound


# --------------------------------------------------------------------------- principals


def test_principals_crud_and_revoke(store: Store) -> None:
    alice = store.add_principal("alice", "client", "$7$hash-a", note="laptop", now=T0)
    assert (alice.id, alice.role, alice.created_at, alice.note, alice.revoked) == (
        "alice",
        "client",
        T0,
        "laptop",
        False,
    )
    assert "$7$hash-a" not in repr(alice)
    store.add_principal("w1", "worker", "$7$hash-w")
    assert store.get_principal("alice") == alice
    assert store.get_principal("nobody") is None
    assert [p.id for p in store.list_principals()] == ["alice", "w1"]
    assert store.principal_hash("alice") == ("client", "$7$hash-a")

    with pytest.raises(AlreadyExists):
        store.add_principal("alice", "admin", "$7$other")

    assert store.revoke_principal("alice", now=T0 + 1) is True
    assert store.revoke_principal("alice") is False
    assert store.principal_hash("alice") is None
    assert [p.id for p in store.list_principals()] == ["w1"]
    assert [p.id for p in store.list_principals(include_revoked=True)] == ["alice", "w1"]
    revoked = store.get_principal("alice")
    assert revoked is not None
    assert revoked.revoked_at == T0 + 1

    again = store.add_principal("alice", "admin", "$7$new", now=T0 + 2)  # re-register
    assert store.principal_hash("alice") == ("admin", "$7$new")
    assert store.get_principal("alice") == again
    assert not again.revoked

    with pytest.raises(NotFound):
        store.revoke_principal("nobody")


@pytest.mark.parametrize(
    ("pid", "role", "token_hash"),
    [("", "client", "h"), ("x" * 129, "client", "h"), ("a", "r" * 17, "h"), ("a", "client", "")],
)
def test_principal_bad_values_are_refused(
    store: Store, pid: str, role: str, token_hash: str
) -> None:
    with pytest.raises(InvalidArgument):
        store.add_principal(pid, role, token_hash)
    assert store.list_principals(include_revoked=True) == []


# --------------------------------------------------------------------------- caps and state


def test_upsert_caps_new_worker(store: Store) -> None:
    record = store.upsert_worker_caps("w1", caps("w1", tags=["gpu", "linux"]), T0)
    assert record.state is S.ONLINE
    assert record.state_changed_at == T0
    assert (record.name, record.description, record.tags) == (
        "name-w1",
        "worker w1",
        ["gpu", "linux"],
    )
    assert (record.cpus, record.memory_bytes, record.os, record.arch) == (
        4,
        8 * 2**30,
        "Linux",
        "x86_64",
    )
    assert (record.slots, record.free_slots, record.executors) == (2, 2, ["process"])
    assert record.caps == caps("w1", tags=["gpu", "linux"])
    assert (record.first_seen, record.last_seen, record.last_heartbeat_at) == (T0, T0, None)
    assert record.heartbeat_interval > 0
    assert record.last_metrics == {}
    events = store.worker_events("w1")
    assert [(e.old_state, e.new_state, e.reason) for e in events] == [(None, S.ONLINE, "joined")]


def test_upsert_caps_tolerates_missing_optional_parts(store: Store) -> None:
    record = store.upsert_worker_caps("w2", {"wid": "w2"}, T0)
    assert (record.name, record.tags, record.cpus, record.slots, record.os) == ("w2", [], 0, 1, "")
    assert (
        store.upsert_worker_caps("w3", {"slots": 0, "heartbeat_s": 1.5}, T0).heartbeat_interval
        == 1.5
    )


def test_upsert_caps_update_keeps_identity(store: Store) -> None:
    store.upsert_worker_caps("w1", caps("w1"), T0)
    store.record_heartbeats([("w1", beat("w1", 1, free_slots=2), T0 + 1)])
    record = store.upsert_worker_caps("w1", caps("w1", name="renamed", slots=1, tags=[]), T0 + 5)
    assert (record.name, record.slots, record.free_slots, record.tags) == ("renamed", 1, 1, [])
    assert (record.first_seen, record.last_seen, record.state) == (T0, T0 + 5, S.ONLINE)
    assert len(store.worker_events("w1")) == 1  # no transition: no new event


def test_caps_bring_lost_worker_back_but_leave_draining(store: Store) -> None:
    store.upsert_worker_caps("w1", caps("w1"), T0)
    store.set_worker_state("w1", S.LOST, "missed heartbeats", T0 + 10)
    assert store.upsert_worker_caps("w1", caps("w1"), T0 + 20).state is S.ONLINE
    store.set_worker_state("w1", S.DRAINING, "admin drain", T0 + 30)
    assert store.upsert_worker_caps("w1", caps("w1"), T0 + 40).state is S.DRAINING
    moves = [(e.old_state, e.new_state) for e in reversed(store.worker_events("w1"))]
    assert moves == [
        (None, S.ONLINE),
        (S.ONLINE, S.LOST),
        (S.LOST, S.ONLINE),
        (S.ONLINE, S.DRAINING),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        {"wid": "someone-else"},
        {"tags": "gpu"},
        {"tags": [1, 2]},
        {"executors": "process"},
        {"name": "n" * 129},
    ],
)
def test_bad_caps_change_nothing(store: Store, bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        store.upsert_worker_caps("w1", {**caps("w1"), **bad}, T0)
    assert store.get_worker("w1") is None
    assert store.worker_events("w1") == []


def test_transitions_are_recorded_as_events(store: Store) -> None:
    store.upsert_worker_caps("w1", caps("w1"), T0)
    assert store.set_worker_state("w1", S.DRAINING, "admin drain", T0 + 1) == (S.ONLINE, S.DRAINING)
    assert store.set_worker_state("w1", S.DRAINING, "again", T0 + 2) is None  # no-op
    assert store.set_worker_state("w1", S.OFFLINE, "clean shutdown", T0 + 3) == (
        S.DRAINING,
        S.OFFLINE,
    )
    record = store.get_worker("w1")
    assert record is not None
    assert (record.state, record.state_reason, record.state_changed_at) == (
        S.OFFLINE,
        "clean shutdown",
        T0 + 3,
    )
    events = store.worker_events("w1")
    assert [(e.old_state, e.new_state, e.reason, e.ts) for e in events] == [
        (S.DRAINING, S.OFFLINE, "clean shutdown", T0 + 3),
        (S.ONLINE, S.DRAINING, "admin drain", T0 + 1),
        (None, S.ONLINE, "joined", T0),
    ]
    assert [e.new_state for e in store.worker_events("w1", limit=1)] == [S.OFFLINE]


def test_invalid_transition_is_refused(store: Store) -> None:
    store.upsert_worker_caps("w1", caps("w1"), T0)
    store.set_worker_state("w1", S.OFFLINE, "clean shutdown", T0 + 1)
    with pytest.raises(InvalidTransition) as info:
        store.set_worker_state("w1", S.LOST, "last will", T0 + 2)
    assert (info.value.old, info.value.new) == (S.OFFLINE, S.LOST)
    record = store.get_worker("w1")
    assert record is not None
    assert record.state is S.OFFLINE
    assert len(store.worker_events("w1")) == 2


def test_set_state_of_unknown_worker(store: Store) -> None:
    with pytest.raises(NotFound):
        store.set_worker_state("ghost", S.LOST, "missed", T0)


def test_status_from_worker_moves_last_seen(store: Store) -> None:
    store.upsert_worker_caps("w1", caps("w1"), T0)
    store.set_worker_state("w1", S.DRAINING, "admin drain", T0 + 5)
    assert store.get_worker("w1").last_seen == T0  # type: ignore[union-attr]
    store.set_worker_state("w1", S.DRAINING, "worker says draining", T0 + 9, seen=True)
    assert store.get_worker("w1").last_seen == T0 + 9  # type: ignore[union-attr]


# --------------------------------------------------------------------------- heartbeats


def test_heartbeat_batch(store: Store) -> None:
    for wid in ("w1", "w2", "w3"):
        store.upsert_worker_caps(wid, caps(wid), T0)
    store.set_worker_state("w2", S.LOST, "missed heartbeats", T0 + 1)
    store.set_worker_state("w3", S.OFFLINE, "clean shutdown", T0 + 1)
    batch = [
        ("w1", beat("w1", 1, free_slots=2), T0 + 2),
        ("ghost", beat("ghost", 1), T0 + 2),
        ("w1", beat("w1", 3, free_slots=0, interval_s=3.0), T0 + 4),
        ("w1", beat("w1", 2), T0 + 3),  # arrived late: stored as a sample, not as "latest"
        ("w2", beat("w2", 7), T0 + 4),
        ("w3", beat("w3", 1), T0 + 4),
    ]
    report = store.record_heartbeats(batch)
    assert report == HeartbeatReport(accepted=5, unknown=["ghost"], inactive=["w2", "w3"])

    w1 = store.get_worker("w1")
    assert w1 is not None
    assert (w1.heartbeat_seq, w1.free_slots, w1.heartbeat_interval) == (3, 0, 3.0)
    assert (w1.last_seen, w1.last_heartbeat_at) == (T0 + 4, T0 + 4)
    assert w1.last_metrics == beat("w1", 3, free_slots=0, interval_s=3.0)
    assert w1.state is S.ONLINE
    w2 = store.get_worker("w2")
    assert w2 is not None
    assert w2.state is S.LOST  # caller revives
    assert w2.heartbeat_seq == 7

    rows = samples_of(store, "w1")
    assert [(r["ts"], r["cpu_percent"], r["mem_used_bytes"], r["running"]) for r in rows] == [
        (T0 + 2, 11.0, 1001, 1),
        (T0 + 4, 13.0, 1003, 1),
        (T0 + 3, 12.0, 1002, 1),
    ]
    assert samples_of(store, "ghost") == []
    assert store.record_heartbeats([]) == HeartbeatReport(0, [], [])


def test_malformed_heartbeat_values_do_not_sink_the_batch(store: Store) -> None:
    store.upsert_worker_caps("w1", caps("w1"), T0)
    store.upsert_worker_caps("w2", caps("w2"), T0)
    weird = beat(
        "w1",
        5,
        cpu_percent=float("nan"),
        load1="high",
        mem_used_bytes=2**70,
        running="many",
        free_slots=None,
        interval_s=-1,
    )
    report = store.record_heartbeats(
        [("w1", weird, T0 + 1), ("w2", beat("w2", 1), T0 + 1), ("w2", "not a dict", T0 + 2)]  # type: ignore[list-item]
    )
    assert report.accepted == 2
    (row,) = samples_of(store, "w1")
    assert (row["cpu_percent"], row["load1"], row["mem_used_bytes"], row["running"]) == (
        None,
        None,
        None,
        0,
    )
    w1 = store.get_worker("w1")
    assert w1 is not None
    assert (w1.free_slots, w1.heartbeat_seq) == (2, 5)  # missing free_slots keeps the old value
    assert w1.heartbeat_interval > 0
    assert w1.last_metrics["cpu_percent"] is None  # stored as strict JSON
    assert "cpu_percent" not in wire.worker_summary(w1)
    json.dumps(wire.worker_summary(w1), allow_nan=False)


def test_large_heartbeat_batch_is_chunked(store: Store) -> None:
    wids = [f"w{i:04d}" for i in range(700)]  # > IN_CHUNK and MYSQL_UPDATE_ROWS (500)
    for wid in wids:
        store.upsert_worker_caps(wid, {"name": wid}, T0)
    batch = [(wid, beat(wid, seq), T0 + seq) for seq in (1, 2) for wid in wids]
    report = store.record_heartbeats(batch)
    assert (report.accepted, report.unknown, report.inactive) == (1400, [], [])
    assert {w.heartbeat_seq for w in store.list_workers()} == {2}
    with store.db.connection_context():
        assert store.models.WorkerSample.select().count() == 1400


def test_concurrent_writers_and_readers(store: Store) -> None:
    """Threads share the store: heartbeats, state changes and listings at once."""
    wids = [f"w{i}" for i in range(20)]
    for wid in wids:
        store.upsert_worker_caps(wid, caps(wid), T0)
    errors: list[BaseException] = []

    def run(job: int) -> None:
        try:
            for seq in range(20):
                if job % 3 == 0:
                    store.record_heartbeats([(wid, beat(wid, seq), T0 + seq) for wid in wids])
                elif job % 3 == 1:
                    state = S.DRAINING if seq % 2 else S.ONLINE
                    store.set_worker_state(wids[job], state, "flip", T0 + seq)
                else:
                    assert len(store.list_workers()) == len(wids)
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(job,)) for job in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    with store.db.connection_context():
        assert store.models.WorkerSample.select().count() == 3 * 20 * len(wids)


def test_memory_store_is_shared_by_threads() -> None:
    with Store.open("sqlite:///:memory:") as mem:
        mem.upsert_worker_caps("w1", caps("w1"), T0)
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(len(mem.list_workers())))
        thread.start()
        thread.join(timeout=10)
        assert seen == [1]


# --------------------------------------------------------------------------- queries


@pytest.fixture
def grid(store: Store) -> Store:
    """Four workers with distinct tags, sizes and states; joined in the order a, b, c, d."""
    store.upsert_worker_caps("d", caps("d", name="dup", tags=["x"]), T0 + 3)
    store.upsert_worker_caps(
        "a", caps("a", name="alpha", tags=["gpu", "linux"], cpu={"count": 16}), T0
    )
    store.upsert_worker_caps("c", caps("c", name="dup", memory_bytes=2**30), T0 + 1)
    store.upsert_worker_caps("b", caps("b", name="beta", tags=["gpu"], cpu={"count": 2}), T0 + 1)
    store.set_worker_state("c", S.LOST, "missed", T0 + 9)
    store.set_worker_state("d", S.DRAINING, "admin drain", T0 + 9)
    return store


def ids(records: list[Any]) -> list[str]:
    return [r.id for r in records]


def test_list_order_is_first_seen_then_id(grid: Store) -> None:
    assert ids(grid.list_workers()) == ["a", "b", "c", "d"]


def test_list_filters(grid: Store) -> None:
    assert ids(grid.list_workers(state=S.ONLINE)) == ["a", "b"]
    assert ids(grid.list_workers(state=[S.LOST, S.DRAINING])) == ["c", "d"]
    assert ids(grid.list_workers(tags=["gpu"])) == ["a", "b"]
    assert ids(grid.list_workers(tags=["gpu", "linux"])) == ["a"]
    assert ids(grid.list_workers(tags=[])) == ["a", "b", "c", "d"]
    assert ids(grid.list_workers(min_cpus=4)) == ["a", "c", "d"]
    assert ids(grid.list_workers(min_memory_bytes=2**31)) == ["a", "b", "d"]
    assert ids(grid.list_workers(name="dup")) == ["c", "d"]
    assert ids(grid.list_workers(state=S.ONLINE, tags=["gpu"], min_cpus=8)) == ["a"]
    assert grid.list_workers(name="nobody") == []


def test_get_worker_by_id_or_unique_name(grid: Store) -> None:
    assert grid.get_worker("a").name == "alpha"  # type: ignore[union-attr]
    assert grid.get_worker("beta").id == "b"  # type: ignore[union-attr]
    assert grid.get_worker("dup") is None  # ambiguous
    assert grid.get_worker("nobody") is None


def test_ids_are_case_sensitive(store: Store) -> None:
    store.upsert_worker_caps("w1", caps("w1", name="low"), T0)
    store.upsert_worker_caps("W1", caps("W1", name="UP"), T0)
    assert store.get_worker("W1").name == "UP"  # type: ignore[union-attr]
    assert store.get_worker("w1").name == "low"  # type: ignore[union-attr]


def test_live_worker_deadlines(grid: Store) -> None:
    grid.record_heartbeats([("a", beat("a", 1, interval_s=2.5), T0 + 20)])
    deadlines = grid.live_worker_deadlines()
    assert [d[0] for d in deadlines] == ["a", "b", "d"]
    assert deadlines[0] == ("a", T0 + 20, 2.5)


def test_worker_summary_wire(grid: Store) -> None:
    grid.record_heartbeats([("a", beat("a", 1), T0 + 20)])
    summary = wire.worker_summary(grid.get_worker("a"))  # type: ignore[arg-type]
    assert summary == {
        "id": "a",
        "name": "alpha",
        "state": "online",
        "tags": ["gpu", "linux"],
        "cpus": 16,
        "memory_bytes": 8 * 2**30,
        "os": "Linux",
        "arch": "x86_64",
        "slots": 2,
        "free_slots": 1,
        "last_seen": T0 + 20,
        "description": "worker a",
        "executors": ["process"],
        "cpu_percent": 11.0,
        "load1": 0.5,
    }
    assert "cpu_percent" not in wire.worker_summary(grid.get_worker("b"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reservations


def audit(rid: str, wid: str, client: str, exec_id: str, **extra: Any) -> dict[str, Any]:
    """The keyword arguments of one exec audit row (as the coordinator's writer sends)."""
    row: dict[str, Any] = {
        "reservation_id": rid, "worker_id": wid, "client_id": client, "exec_id": exec_id,
        "command": "echo hi", "started_at": T0, "reported_at": T0 + 1, "mode": "output",
        "exit_code": 0, "duration_s": 0.5, "output_bytes": 3,
    }
    row.update(extra)
    return row


def test_reservation_lifecycle_in_the_store(store: Store) -> None:
    store.add_principal("alice", "client", "$7$a", now=T0)
    store.upsert_worker_caps("w1", caps("w1"), T0)
    opening = store.create_reservation(rid="r1", worker_id="w1", client_id="alice",
                                       lease_s=30, now=T0, session="s1")
    assert (opening.state, opening.expires_at, opening.live) == (
        ReservationState.OPENING, T0 + 30, True)
    with pytest.raises(WorkerAlreadyReserved):
        store.create_reservation(rid="r2", worker_id="w1", client_id="bob", lease_s=30, now=T0)
    active = store.activate_reservation("r1", T0 + 2)
    assert active is not None
    assert (active.state, active.expires_at) == (ReservationState.ACTIVE, T0 + 32)
    assert store.reservation_of_worker("w1") == active
    assert wire.reservation(active, "name-w1") == {
        "id": "r1", "worker": "w1", "client": "alice", "state": "active",
        "created_at": T0, "expires_at": T0 + 32, "lease_s": 30.0, "image": None,
        "executor": None, "worker_name": "name-w1", "session": "s1",
    }
    ended = store.end_reservation("r1", "released", T0 + 5)
    assert ended is not None
    assert ended[0] is ReservationState.ACTIVE
    assert (ended[1].state, ended[1].ended_at, ended[1].live) == (
        ReservationState.ENDED, T0 + 5, False)
    assert store.end_reservation("r1", "again", T0 + 6) is None  # exactly one winner
    assert store.reserved_worker_ids() == set()
    assert wire.reservation(ended[1])["ended_reason"] == "released"


def test_exec_audit_records_carry_the_outcome(store: Store) -> None:
    rows = [audit("r1", "w1", "alice", "e1"),
            audit("r1", "w1", "alice", "e2", command="x" * 2000, exit_code=None, signal=9,
                  error="e" * 5000, oom_killed=True)]
    assert store.record_exec_audits(rows) == 2
    assert store.record_exec_audits(rows[:1]) == 1  # redelivered: stored once
    second, first = store.list_exec_audit(client_id="alice")
    assert isinstance(first, Outcome)
    assert first.ok
    assert first.outcome() == Outcome(exit_code=0, duration_s=0.5, output_bytes=3)
    assert not second.ok
    assert second.describe().startswith("out of memory")
    assert second.error is not None
    assert len(second.error) == 4096
    entry = wire.audit_entry(first)
    assert entry == {
        "id": first.id, "reservation": "r1", "worker": "w1", "client": "alice",
        "exec_id": "e1", "command": "echo hi", "started_at": T0, "reported_at": T0 + 1,
        "mode": "output", "exit_code": 0, "duration_s": 0.5, "output_bytes": 3,
    }
    long = wire.audit_entry(second)
    assert long["command_truncated"] is True
    assert len(long["command"]) == 1025
    assert (long["signal"], long["oom_killed"]) == (9, True)
    assert "exit_code" not in long
    assert store.list_exec_audit(client_id="bob") == []


# --------------------------------------------------------------------------- lifecycle


def test_reopened_store_keeps_everything(db_url: str) -> None:
    """A restarted coordinator finds its memory: principals, workers, events, samples."""
    with Store.open(db_url) as first:
        first.add_principal("alice", "client", "$7$a", now=T0)
        first.upsert_worker_caps("w1", caps("w1"), T0)
        first.record_heartbeats([("w1", beat("w1", 4), T0 + 1)])
        first.set_worker_state("w1", S.DRAINING, "admin drain", T0 + 2)
        before = first.get_worker("w1")
    with Store.open(db_url) as second:
        assert second.get_worker("w1") == before
        assert second.principal_hash("alice") == ("client", "$7$a")
        assert len(second.worker_events("w1")) == 2
        assert len(samples_of(second, "w1")) == 1
        assert second.live_worker_deadlines() == [("w1", T0 + 1, 2.0)]


def fill(target: Store, tag: str, workers: int = 5) -> None:
    """Write a bit of everything through ``target``, every row marked with ``tag``."""
    target.add_principal(f"{tag}-client", "client", f"$7${tag}", now=T0)
    for i in range(workers):
        wid = f"{tag}-w{i}"
        target.upsert_worker_caps(wid, caps(wid, tags=[tag]), T0)
        target.record_heartbeats([(wid, beat(wid, seq), T0 + seq) for seq in (1, 2)])
    target.set_worker_state(f"{tag}-w0", S.DRAINING, f"drained in {tag}", T0 + 3)
    target.create_reservation(rid=f"{tag}-r", worker_id=f"{tag}-w1",
                              client_id=f"{tag}-client", lease_s=60, now=T0)
    target.record_exec_audits([audit(f"{tag}-r", f"{tag}-w1", f"{tag}-client", f"{tag}-e")])


def check_only(target: Store, tag: str, workers: int = 5) -> None:
    """``target`` holds exactly what ``fill(target, tag)`` wrote, nothing of another tag."""
    wids = {f"{tag}-w{i}" for i in range(workers)}
    assert [p.id for p in target.list_principals()] == [f"{tag}-client"]
    assert {w.id for w in target.list_workers()} == wids
    assert {w.id for w in target.list_workers(tags=[tag])} == wids
    assert {w.heartbeat_seq for w in target.list_workers()} == {2}
    assert target.worker_events(f"{tag}-w0")[0].reason == f"drained in {tag}"
    assert [r.id for r in target.list_reservations()] == [f"{tag}-r"]
    assert target.reserved_worker_ids() == {f"{tag}-w1"}
    assert [a.exec_id for a in target.list_exec_audit()] == [f"{tag}-e"]
    with target.db.connection_context():
        assert target.models.WorkerSample.select().count() == 2 * workers


def test_two_stores_side_by_side(store: Store, tmp_path: Any) -> None:
    """Each Store has its own bound models: two databases (SQLite + SQLite, or MariaDB +
    SQLite) open at once, written from threads at the same time, never see each other."""
    with Store.open(f"sqlite:///{tmp_path}/second.db") as other:
        assert other.models.Worker is not store.models.Worker
        assert other.models.Worker._meta.database is other.db
        assert store.models.Worker._meta.database is store.db
        assert Worker._meta.database is None  # the declared models stay unbound
        errors: list[BaseException] = []

        def run(target: Store, tag: str) -> None:
            try:
                fill(target, tag)
            except BaseException as err:  # reported below, in the test's thread
                errors.append(err)

        threads = [threading.Thread(target=run, args=(store, "one")),
                   threading.Thread(target=run, args=(other, "two"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        check_only(store, "one")
        check_only(other, "two")
        assert store.get_worker("two-w1") is None  # the first one is untouched by the second
        assert other.get_worker("one-w1") is None
        assert other.migrate() == migrations.LATEST_VERSION  # migrations are per database
    check_only(store, "one")  # closing one store leaves the other working
    with pytest.raises(StoreError, match="closed"):
        other.list_workers()


def test_bound_models_cover_every_model(store: Store) -> None:
    """A model added to MODELS without its line on BoundModels fails here."""
    assert set(BoundModels.__annotations__) == {m.__name__ for m in MODELS}
    for model in MODELS:
        bound = getattr(store.models, model.__name__)
        assert issubclass(bound, model)
        assert bound is not model
        assert bound._meta.table_name == model._meta.table_name
        assert bound._meta.database is store.db
    assert [m._meta.table_name for m in store.models.all] == [m._meta.table_name for m in MODELS]


def test_closed_store_refuses_calls(db_url: str) -> None:
    opened = Store.open(db_url)
    opened.close()
    opened.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        opened.list_workers()
    assert Worker._meta.database is None


def test_relative_sqlite_path_creates_directories(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    with Store.open("sqlite:///var/xc/state.db") as opened:
        assert opened.backend == "sqlite"
    assert (tmp_path / "var" / "xc" / "state.db").is_file()


def test_sqlite_is_in_wal_mode(tmp_path: Any) -> None:
    with Store.open(f"sqlite:///{tmp_path}/x.db") as opened, opened.db.connection_context():
        assert opened.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert opened.db.execute_sql("PRAGMA busy_timeout").fetchone()[0] == 5000


# --------------------------------------------------------------------------- bad URLs


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "no database URL"),
        ("postgres://u:pw@h/db", "unsupported database URL"),
        ("sqlite://relative.db", "bad SQLite URL"),
        ("sqlite:///", "bad SQLite URL"),
        ("mysql://root:pw@127.0.0.1:3306", "needs a host and a database name"),
        ("mysql://root:pw@127.0.0.1:notaport/db", "bad MySQL URL"),
        ("mysql://root:pw@127.0.0.1/bad;name", "database name"),
        ("mysql://root:pw@127.0.0.1/db?ssl=1", "unknown option"),
    ],
)
def test_bad_url_is_a_clear_store_error(url: str, says: str) -> None:
    with pytest.raises(StoreError, match=says) as info:
        Store.open(url)
    assert "pw" not in str(info.value)
    assert isinstance(info.value, CoordinatorError)


def test_unreachable_mysql_is_a_clear_store_error() -> None:
    with pytest.raises(StoreError) as info:
        Store.open("mysql://admin:s3cr3t@127.0.0.1:1/xcloud?connect_timeout=2")
    message = str(info.value)
    assert "s3cr3t" not in message
    assert "mysql://admin:***@127.0.0.1:1/xcloud" in message
    assert "running" in message  # says what to check
    assert Worker._meta.database is None


def test_unwritable_sqlite_directory(tmp_path: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot create the directory"):
        Store.open(f"sqlite:///{blocker}/sub/x.db")


def test_sqlite_file_that_is_not_a_database(tmp_path: Any) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=r"junk\.db"):
        Store.open(f"sqlite:///{junk}")
    assert Worker._meta.database is None


def test_mask_url() -> None:
    assert mask_url("mysql://u:p%40ss@h:3306/db") == "mysql://u:***@h:3306/db"
    assert mask_url("mysql://u:p@ss@h/db") == "mysql://u:***@h/db"
    assert mask_url("mysql://u@h/db") == "mysql://u@h/db"
    assert mask_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.mariadb
def test_mysql_wrong_password_is_masked(mariadb_server: MariaDBServer) -> None:
    url = f"mysql://{mariadb_server.user}:wr0ngpass@{mariadb_server.host}:{mariadb_server.port}/xc"
    if mariadb_server.password:
        url = url.replace("wr0ngpass", "wr0ngpass" + mariadb_server.password)
    with pytest.raises(StoreError) as info:
        Store.open(url)
    assert "wr0ngpass" not in str(info.value)
    assert ":***@" in str(info.value)


@pytest.mark.mariadb
def test_mysql_database_is_created_when_missing(mariadb_server: MariaDBServer) -> None:
    name = f"xc_t_{uuid.uuid4().hex[:10]}"
    try:
        with Store.open(mariadb_server.url(name)) as opened:
            assert opened.backend == "mysql"
            opened.upsert_worker_caps("w1", caps("w1"), T0)
        conn = mariadb_server.connect(name)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA "
                    "WHERE SCHEMA_NAME = %s",
                    (name,),
                )
                assert cur.fetchone()[0] == "utf8mb4_bin"
        finally:
            conn.close()
    finally:
        mariadb_server.drop_database(name)
