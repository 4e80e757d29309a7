"""``Statements.insert_rows``: the submit's bulk insert without peewee composing it.

It must write exactly the rows peewee's ``insert_many`` writes (every column, the
fields' defaults for the missing ones, values through ``db_value``), on both backends.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from coordinator.store import Store
from coordinator.store.values import dicts, dumps

T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    url = (f"sqlite:///{tmp_path}/state/xcloud.db" if request.param == "sqlite"
           else request.getfixturevalue("fresh_mariadb_url"))
    with Store.open(url) as opened:
        yield opened


def _row(jid: str, **extra: Any) -> dict[str, Any]:
    return {"id": jid, "batch": "b1", "owner": "alice", "state": "queued",
            "submitted_at": T0, "spec": dumps({"command": "true"}), "updated_at": T0,
            **extra}


def _read(store: Store, jid: str) -> dict[str, Any]:
    Job = store.models.Job
    with store.db.connection_context():
        rows = dicts(Job.select().where(Job.id == jid))
    assert len(rows) == 1
    return {k: v for k, v in rows[0].items() if k != "id"}


@pytest.mark.parametrize("extra", [
    {},  # every other column at its default
    {"name": "n", "rank": -5, "cpus": 2, "memory_bytes": 3 << 30, "gpus": 1,
     "max_system_retries": 0, "max_retries": 4, "replicas": 2, "quorum": 2,
     "after": dumps(["j-x"]), "waiting": 1, "exit_code": None, "hold_reason": None},
])
def test_insert_rows_writes_what_insert_many_writes(store: Store, extra: dict[str, Any]
                                                    ) -> None:
    Job = store.models.Job
    with store.db.connection_context(), store.db.atomic():
        Job.insert_many([_row("j-peewee", **extra)]).execute()
        store._sql.insert_rows(Job, [_row("j-raw", **extra)])
    assert _read(store, "j-raw") == _read(store, "j-peewee")


def test_insert_rows_many_and_none(store: Store) -> None:
    Job = store.models.Job
    with store.db.connection_context():
        with store.db.atomic():
            store._sql.insert_rows(Job, [])
            store._sql.insert_rows(Job, [_row(f"j{i}", rank=-i) for i in range(250)])
        assert Job.select().count() == 250
    assert _read(store, "j7")["rank"] == -7


def test_submitted_jobs_have_every_default(store: Store) -> None:
    """submit_jobs goes through insert_rows: the columns it does not name get their
    defaults, not NULL (a NULL ``waiting`` would hide the job from the queue)."""
    _batch, ids = store.submit_jobs("alice", [{"command": "true"}] * 3, now=T0)
    row = _read(store, ids[0])
    assert row["waiting"] == 0
    assert row["after"] == "[]"
    assert row["attempts"] == 0
    assert row["system_failures"] == 0
    assert row["current_attempt"] is None
    assert sorted(j.id for j in store.queued_jobs(10)) == sorted(ids)
