"""``xcloud admin forget WORKER`` (issue 8, item 21): a lost or offline worker used to
stay in the listing for good. On both brokers (Mosquitto through the exported ACL: the
coordinator clears the worker's retained topics)."""

from __future__ import annotations

import threading

import pytest

from client.reservation import Refused
from tests.fixtures.grid import ADMIN, GridHarness

pytestmark = [pytest.mark.integration]


def retained_caps(grid: GridHarness, *wids: str) -> set[str]:
    """The workers among ``wids`` whose caps are retained on the broker.

    One subscription per worker, in order, then one for a worker known to have retained
    caps: the broker sends each filter's retained messages before it handles the next
    SUBSCRIBE, so once the sentinel's arrive the others' have arrived too.
    """
    sentinel = "w-sentinel"
    got: set[str] = set()
    done = threading.Event()
    bus = grid.bus(ADMIN, "admin", start=False)

    def seen(topic: str, payload: bytes, retained: bool) -> None:
        wid = topic.split("/")[-2]
        if retained and payload:
            got.add(wid)
        if wid == sentinel:
            done.set()

    for wid in (*wids, sentinel):
        bus.subscribe_raw(grid.topics.worker_caps(wid), seen)
    bus.start(timeout=5)
    assert done.wait(10), "the sentinel's retained caps never came"
    bus.stop()
    return got - {sentinel}


def test_an_admin_forgets_a_worker_that_is_gone(grid: GridHarness) -> None:
    grid.start_coordinator()
    grid.start_worker("w-sentinel")
    gone = grid.start_worker("w-gone")
    admin = grid.client()
    alice = grid.client("alice", "client")

    with pytest.raises(Refused) as info:
        admin.forget_worker("w-gone")
    assert info.value.code == "conflict"
    assert "only a lost or offline worker" in str(info.value)

    gone.stop()
    grid.wait_worker("w-gone", "offline")
    assert retained_caps(grid, "w-gone") == {"w-gone"}
    with pytest.raises(Refused) as info:
        alice.forget_worker("w-gone")
    assert info.value.code == "forbidden"
    assert grid.worker_record("w-gone") is not None

    assert admin.forget_worker("w-gone") == "w-gone"
    assert grid.worker_record("w-gone") is None
    assert "w-gone" not in [w.id for w in admin.workers()]
    assert retained_caps(grid, "w-gone") == set()  # a restarted coordinator won't revive it
    with pytest.raises(Refused) as info:
        admin.forget_worker("w-gone")
    assert info.value.code == "not_found"

    # If the machine comes back, it simply joins again.
    grid.start_worker("w-gone")
    assert "w-gone" in [w.id for w in admin.workers()]

