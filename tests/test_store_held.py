"""``StoreBase.held``: one pooled connection for a block of store calls (a scheduler pass),
where every call used to check one out and give it back. Calls inside still commit on
their own, still map database failures to ``StoreError``, and outside the block each
call takes a connection as before; a failure inside does not keep the connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import peewee
import pytest

from coordinator.errors import StoreError
from coordinator.store import Store
from tests.fixtures.backends import BOTH_DBS

pytestmark = BOTH_DBS


@pytest.fixture
def store(grid_db_url: str) -> Iterator[Store]:
    with Store.open(grid_db_url) as opened:
        yield opened


def _count_checkouts(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    count = [0]
    original = store.db.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(store.db, "connect", connect)
    return count


def test_calls_in_a_held_block_share_one_checkout(store: Store,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    checkouts = _count_checkouts(store, monkeypatch)
    store.get_worker("nope")
    store.get_worker("nope")
    assert checkouts[0] == 2  # outside: one each, as before
    with store.held():
        for _ in range(5):
            assert store.get_worker("nope") is None
        with store.held():  # nested: still the same one
            store.get_worker("nope")
    assert checkouts[0] == 3
    assert store.db.is_closed()  # given back at the end of the block


def test_a_failure_inside_is_a_store_error_and_the_connection_goes_back(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StoreError, match=r"no.such.table"), store.held():
        store.db.execute_sql("SELECT * FROM no_such_table")  # raw: mapped at the block's end
    assert store.db.is_closed()
    # A store call that fails inside the block raises StoreError itself (the pass catches
    # that around single calls), not the driver's error, and the block goes on.

    def fail(*_a: Any, **_k: Any) -> Any:
        raise peewee.ProgrammingError("boom")

    with store.held():
        monkeypatch.setattr(store.db, "execute_sql", fail)
        with pytest.raises(StoreError, match="boom"):
            store.get_worker("nope")
        monkeypatch.undo()
        assert store.get_worker("nope") is None
    assert store.db.is_closed()
