"""The coordinator with real brokers, databases and workers: presence, liveness, restart.

Most tests run on SQLite with both brokers; the liveness and restart tests also run on
MariaDB. Liveness is short here (heartbeat 0.2 s, factor 2: a silent worker is lost
after 0.6 s); the assertions use generous timeouts and only *measure* how long things
took (``-s`` prints the ``MEASURE`` lines).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from client.api import WorkerInfo
from client.errors import ClientError
from client.reservation import Refused
from coordinator.store import Store
from coordinator.worker_state import WorkerState
from tests.fixtures.actors import minimal_caps
from tests.fixtures.backends import BOTH_DBS
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import wait_for

pytestmark = [pytest.mark.integration]

Measure = Callable[[str, float], None]


def samples_of(store: Store, wid: str) -> int:
    sample = store.models.WorkerSample
    with store.db.connection_context():
        count: int = sample.select().where(sample.worker_id == wid).count()
    return count


# ----------------------------------------------------------------------- join and list


def test_workers_join_and_are_listed_with_their_caps(grid: GridHarness) -> None:
    grid.start_coordinator()
    alpha = grid.start_worker("w-alpha", tags=["gpu", "fast"], display_name="alpha")
    beta = grid.start_worker("w-beta", tags=["fast"], display_name="beta", slots=2)
    assert alpha.agent is not None
    assert beta.agent is not None
    admin = grid.client()

    rows = admin.workers()
    assert [(r.id, r.name, r.state, r.index) for r in rows] == [
        ("w-alpha", "alpha", "online", 0), ("w-beta", "beta", "online", 1)]
    a, b = rows
    caps = alpha.agent.caps
    assert caps is not None
    assert a.tags == ["gpu", "fast"]
    assert b.tags == ["fast"]
    assert a.cpus == caps.cpu["count"] == psutil.cpu_count()
    assert a.cpus > 0
    assert a.memory_bytes == caps.memory_bytes > 0
    assert a.os == caps.host["os"]
    assert a.arch == caps.host["arch"]
    assert a.executors == ["process"]
    assert a.slots == 1
    assert b.slots == 2

    def ids(**filters: Any) -> list[str]:
        return [w.id for w in admin.workers(**filters)]

    both = ["w-alpha", "w-beta"]
    assert ids(state=["online"]) == both
    assert ids(state=["offline", "lost"]) == []
    assert ids(tags=["gpu"]) == ["w-alpha"]
    assert ids(tags=["fast"]) == both
    assert ids(tags=["gpu", "fast"]) == ["w-alpha"]
    assert ids(tags=["nope"]) == []
    assert ids(min_cpus=a.cpus) == both
    assert ids(min_cpus=a.cpus + 1) == []
    assert ids(min_memory_bytes=a.memory_bytes) == both
    assert ids(min_memory_bytes=a.memory_bytes + 1) == []
    assert ids(name="beta") == ["w-beta"]

    # show by id, then by name; metrics arrive with the heartbeats
    def with_metrics() -> WorkerInfo | None:
        info = admin.worker("w-alpha")
        return info if info.last_metrics else None

    shown = wait_for(with_metrics, 5, message="last_metrics after heartbeats")
    assert shown is not None
    assert shown.id == "w-alpha"
    assert shown.caps["wid"] == "w-alpha"
    assert shown.caps["tags"] == ["gpu", "fast"]
    assert shown.caps["heartbeat_s"] == 0.2
    assert shown.last_metrics["wid"] == "w-alpha"
    assert "cpu_percent" in shown.last_metrics
    assert [e["new_state"] for e in shown.events][-1] == "online"
    assert shown.events[-1]["reason"] == "joined"
    assert admin.worker("beta").id == "w-beta"

    with pytest.raises(Refused) as info:
        admin.worker("nope")
    assert info.value.code == "not_found"
    assert "nope" in str(info.value)

    beta.stop()
    grid.wait_worker("w-beta", "offline")
    assert ids(state=["offline"]) == ["w-beta"]
    assert ids(state=["online"]) == ["w-alpha"]
    assert [w.index for w in admin.workers()] == [0, 1]  # the order does not move


def test_clean_stop_marks_the_worker_offline(grid: GridHarness) -> None:
    coordinator = grid.start_coordinator()
    worker = grid.start_worker("w1")
    worker.stop()
    record = grid.wait_worker("w1", "offline")
    assert record.state_reason == "stopped"
    event = grid.watcher.wait_event("w1", "offline")[1]
    assert (event.old_state, event.reason) == ("online", "stopped")
    # No liveness timer is left to call a cleanly stopped worker "lost" later.
    wait_for(lambda: coordinator.registry.monitor.tracked() == 0, 5,
             message="offline worker no longer tracked")


def test_transitions_publish_worker_events(grid: GridHarness) -> None:
    grid.start_coordinator()
    watcher = grid.watcher
    worker = grid.start_worker("w1", display_name="one")
    assert worker.agent is not None
    watcher.wait_event("w1", "online")
    worker.agent.drain(True)
    watcher.wait_event("w1", "draining")
    worker.agent.drain(False)
    t_back = watcher.wait_event("w1", "draining")[0]
    watcher.wait_event("w1", "online", after=t_back)
    worker.stop()
    watcher.wait_event("w1", "offline")
    events = [(e.old_state, e.new_state, e.name) for _, e in watcher.events("w1")]
    assert events == [(None, "online", "one"), ("online", "draining", "one"),
                      ("draining", "online", "one"), ("online", "offline", "one")]
    assert set(watcher.event_topics()) == {grid.topics.event("worker", "w1")}
    # The same transitions are in the audit trail of the database.
    history = [(e.old_state, e.new_state) for e in reversed(grid.store.worker_events("w1"))]
    assert [(o.value if o else None, n.value) for o, n in history] == [
        (o, n) for o, n, _ in events]


def test_heartbeats_are_written_in_batches(grid: GridHarness,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    grid.start_coordinator()
    grid.start_worker("w-real")
    wait_for(lambda: samples_of(grid.store, "w-real") >= 3, 5, message="samples of w-real")
    record = grid.worker_record("w-real")
    assert record is not None
    assert record.last_heartbeat_at is not None
    assert record.heartbeat_seq >= 1
    assert record.heartbeat_interval == 0.2
    assert record.last_metrics["wid"] == "w-real"
    assert record.last_metrics["seq"] >= 1

    calls: list[int] = []
    original = grid.store.record_heartbeats

    def counting(batch: Any) -> Any:
        if any(wid == "w-burst" for wid, _, _ in batch):
            calls.append(len(batch))
        return original(batch)

    monkeypatch.setattr(grid.store, "record_heartbeats", counting)
    burst = grid.fake_worker("w-burst")
    burst.join()
    n = 300
    for seq in range(1, n + 1):
        burst.heartbeat(seq, cpu_percent=float(seq % 100))
    wait_for(lambda: samples_of(grid.store, "w-burst") == n, 10,
             message=f"{n} samples of w-burst")
    assert sum(calls) >= n, f"batches: {calls}"
    assert len(calls) < n / 5, f"batches: {calls}"
    record = grid.worker_record("w-burst")
    assert record is not None
    assert record.heartbeat_seq == n
    assert record.last_metrics["seq"] == n
    assert record.state.value == "online"


# ----------------------------------------------------------------------- liveness


@BOTH_DBS
def test_killed_worker_is_lost_by_its_last_will(
    grid: GridHarness, measurements: Measure,
) -> None:
    """Its will is confirmed by silence (``will_confirm_s``) or its deadline, whichever
    comes first; the reason stays the will's (docs/state-machines.md)."""
    grid.start_coordinator()
    watcher = grid.watcher
    worker = grid.start_worker("w-kill", in_subprocess=True)
    t0 = watcher.wait_event("w-kill", "online")[0]
    killed_at = time.monotonic()
    assert killed_at >= t0
    worker.kill()
    t_lost, event = watcher.wait_event("w-kill", "lost", after=killed_at, timeout=5)
    measurements("lost_after_sigkill", t_lost - killed_at)
    assert event.old_state == "online"
    assert event.reason == "connection lost"
    record = grid.wait_worker("w-kill", "lost")
    assert record.state_reason == "connection lost"


@BOTH_DBS
def test_paused_worker_is_lost_by_its_deadline_and_comes_back(
    grid: GridHarness, measurements: Measure,
) -> None:
    grid.start_coordinator()
    watcher = grid.watcher
    worker = grid.start_worker("w-pause", in_subprocess=True)
    wait_for(lambda: samples_of(grid.store, "w-pause") >= 2, 5, message="heartbeats flowing")
    paused_at = time.monotonic()
    worker.pause()  # SIGSTOP: the TCP connection stays up, so no last will
    t_lost, event = watcher.wait_event("w-pause", "lost", after=paused_at, timeout=5)
    measurements("lost_after_sigstop", t_lost - paused_at)
    assert event.reason is not None, event
    assert event.reason.startswith("no heartbeat for"), event
    assert grid.wait_worker("w-pause", "lost").state_reason.startswith("no heartbeat")

    resumed_at = time.monotonic()
    worker.resume()
    t_back, back = watcher.wait_event("w-pause", "online", after=resumed_at, timeout=5)
    measurements("online_after_sigcont", t_back - resumed_at)
    assert (back.old_state, back.reason) == ("lost", "heartbeat after lost")
    grid.wait_worker("w-pause", "online")


@BOTH_DBS
def test_restarted_coordinator_keeps_workers_and_detects_later_losses(
    grid: GridHarness, measurements: Measure,
) -> None:
    grid.start_coordinator()
    stay = grid.start_worker("w-stay")
    gone = grid.start_worker("w-gone")
    pause = grid.start_worker("w-pause", in_subprocess=True, wait_online=False)
    kill = grid.start_worker("w-kill", in_subprocess=True, wait_online=False)
    for wid in ("w-pause", "w-kill"):
        grid.wait_worker(wid, "online", timeout=15)
    gone.stop()
    grid.wait_worker("w-gone", "offline")
    wait_for(lambda: samples_of(grid.store, "w-pause") >= 1, 5, message="w-pause heartbeats")
    history = {wid: len(grid.store.worker_events(wid))
               for wid in ("w-stay", "w-gone", "w-pause", "w-kill")}

    grid.stop_coordinator()
    kill.kill()  # dies while nobody is watching: only its retained last will tells
    coordinator = grid.start_coordinator()

    admin = grid.client()
    lost = grid.wait_worker("w-kill", "lost")
    # A retained will may be stale (a broker restart replays them), so it is confirmed
    # by silence past the deadline; whichever the registry handled first names the cause.
    assert (lost.state_reason == "connection lost"
            or lost.state_reason.startswith("no heartbeat for")), lost.state_reason
    states = {w.id: w.state for w in admin.workers()}
    assert states == {"w-stay": "online", "w-gone": "offline", "w-pause": "online",
                      "w-kill": "lost"}
    for wid in ("w-stay", "w-gone", "w-pause"):
        assert len(grid.store.worker_events(wid)) == history[wid], f"{wid} history kept"
    assert coordinator.registry.monitor.tracked() >= 2

    paused_at = time.monotonic()
    pause.pause()
    t_lost, event = grid.watcher.wait_event("w-pause", "lost", after=paused_at, timeout=5)
    measurements("lost_after_sigstop_restarted_coordinator", t_lost - paused_at)
    assert event.reason is not None
    assert event.reason.startswith("no heartbeat")
    assert stay.agent is not None
    assert stay.agent.connected
    assert grid.wait_worker("w-stay", "online").state.value == "online"
    assert {w.id: w.state for w in admin.workers()}["w-stay"] == "online"


@BOTH_DBS
def test_heartbeats_bring_an_offline_worker_back_online(grid: GridHarness) -> None:
    """A second coordinator on the same database (a second ``xcloud up``) marked a live
    worker offline; it only heartbeats on (no new status or caps), and that is enough to
    be online again, and watched again."""
    coordinator = grid.start_coordinator()
    worker = grid.fake_worker("w1")
    # Its caps alone bring it online (no status message left in flight to race with);
    # a long interval: no deadline of its own during the test.
    worker.bus.publish(grid.topics.worker_caps("w1"), minimal_caps("w1", heartbeat_s=600.0),
                       retain=True)
    grid.wait_worker("w1", "online")
    grid.store.set_worker_state("w1", WorkerState.OFFLINE, "another coordinator started",
                                time.time())
    seq = iter(range(1, 10_000))

    def online_again() -> bool:
        worker.heartbeat(next(seq))  # the first, within 0.5 s, may predate the change
        record = grid.store.get_worker("w1")
        return record is not None and record.state == WorkerState.ONLINE

    wait_for(online_again, 10, interval=0.1, message="w1 online again by its heartbeats")
    back = grid.wait_worker("w1", "online")
    assert back.state_reason == "heartbeat after offline"
    events = [(e.old_state, e.new_state) for e in grid.store.worker_events("w1")][:2]
    assert events == [(WorkerState.OFFLINE, WorkerState.ONLINE),
                      (WorkerState.ONLINE, WorkerState.OFFLINE)]
    wait_for(lambda: coordinator.registry.monitor.tracked() == 1, 5,
             message="w1 watched again")


def test_admin_drain_and_undrain(grid: GridHarness) -> None:
    """Only an admin drains; a drained worker is refused for reservations until undrained."""
    grid.start_coordinator()
    grid.start_worker("w-drain")
    admin = grid.client()
    alice = grid.client("alice", "client")
    with pytest.raises(ClientError, match="not an admin"):
        alice.drain("w-drain")
    assert grid.store.get_worker("w-drain").state.value == "online"  # type: ignore[union-attr]
    assert admin.drain("w-drain") == "draining"
    grid.wait_worker("w-drain", "draining")
    with pytest.raises(ClientError):
        alice.reserve("w-drain")
    # A worker that keeps heartbeating stays drained.
    wait_for(lambda: samples_of(grid.store, "w-drain") >= 3, 5, message="heartbeats")
    assert grid.store.get_worker("w-drain").state.value == "draining"  # type: ignore[union-attr]
    with pytest.raises(ClientError, match="no worker"):
        admin.drain("nobody")
    assert admin.drain("w-drain", drain=False) == "online"
    grid.wait_worker("w-drain", "online")
    alice.reserve("w-drain").release()
