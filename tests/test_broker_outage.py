"""Broker restarts and outages (issue 8, items 4 and 5).

- A normal Mosquitto restart (SIGTERM) publishes every client's last will while the
  coordinator is still connected; a will is therefore only a suspicion, confirmed by
  silence while our own connection stays up. Workers survive restarts, and so do their
  reservations; a worker killed with SIGKILL is still found lost.
- While the coordinator is cut off from the broker nobody can renew a lease or say hello,
  so no lease or client grace period ends then, and none for ``reconnect_grace_s`` after
  it is back: a client whose broker was away for longer than its lease keeps using its
  reservation.

Durations here are scenario lengths (an outage longer than a lease), never
synchronisation: every wait polls observed state (``wait_for``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from broker.bus import backoff_delay
from broker.config import BusConfig
from coordinator.reservation_state import ReservationState
from coordinator.service import Coordinator
from coordinator.worker_state import WorkerState
from tests.fixtures.backends import BrokerHandle, MosquittoBroker
from tests.fixtures.grid import GridHarness, WorkerHandle
from tests.fixtures.services import wait_for

pytestmark = [pytest.mark.integration]

MOSQUITTO = pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)
GRACE_S = 3.0  # reconnect_grace_s here: long enough for the harness's 0.5-1 s back-off

Measure = Callable[[str, float], None]


def states_seen(grid: GridHarness, wid: str) -> list[str]:
    """Every state ``wid`` entered, oldest first, from the audited transitions."""
    return [e.new_state.value for e in reversed(grid.store.worker_events(wid))]


def heard_since(grid: GridHarness, wid: str, since: float) -> bool:
    record = grid.store.get_worker(wid)
    return bool(record and record.last_heartbeat_at and record.last_heartbeat_at > since)


def wait_back(grid: GridHarness, coordinator: Coordinator, epoch: int,
              workers: list[str], since: float) -> None:
    """The coordinator reconnected past ``epoch`` and has heard every worker since
    ``since`` (the broker's restart), and no last will waits for a verdict: whatever the
    restart made it decide is decided."""
    wait_for(lambda: coordinator.bus.link_state().epoch > epoch
             and coordinator.bus.connected.is_set(), 20, message="coordinator reconnected")
    for wid in workers:
        wait_for(lambda w=wid: heard_since(grid, w, since), 20,  # type: ignore[misc]
                 message=f"heartbeat from {wid} after the restart")
    wait_for(lambda: coordinator.registry.monitor.suspects() == 0, 20,
             message="every last will confirmed or cleared")


def test_reconnect_backoff_is_short_and_jittered() -> None:
    """Every bus waits at most ``reconnect_max_s`` (it was 15 s), and components that lost
    the broker together do not come back in one burst."""
    cfg = BusConfig()
    assert cfg.reconnect_max_s <= 5.0
    rng = random.Random(8)
    for attempt in range(12):
        base = min(cfg.reconnect_max_s, cfg.reconnect_min_s * 2 ** attempt)
        delay = backoff_delay(attempt, cfg.reconnect_min_s, cfg.reconnect_max_s, rng)
        assert base / 2 <= delay <= base, (attempt, delay)
    after_an_outage = {backoff_delay(6, cfg.reconnect_min_s, cfg.reconnect_max_s,
                                     random.Random(seed)) for seed in range(20)}
    assert len(after_an_outage) == 20
    assert max(after_an_outage) - min(after_an_outage) > cfg.reconnect_max_s / 4


@MOSQUITTO
def test_mosquitto_restarts_lose_no_worker_and_no_reservation(
    grid: GridHarness, grid_broker: BrokerHandle, measurements: Measure,
) -> None:
    coordinator = grid.start_coordinator(reconnect_grace_s=GRACE_S)
    grid.start_worker("w1")
    killed: WorkerHandle = grid.start_worker("w2", in_subprocess=True)
    alice = grid.client("alice", "client")
    held = alice.reserve("w1", lease_s=6.0)
    port = grid_broker.port
    # From its first restart on, Mosquitto keeps sessions and retained messages on disk
    # (Debian's default), so it also replays, after each later restart, the wills it
    # published while going down, to the coordinator's persistent session.
    assert isinstance(grid_broker, MosquittoBroker)
    grid_broker.proc.extra_config += "\npersistence true\n"

    for _ in range(3):
        epoch = coordinator.bus.link_state().epoch
        grid_broker.stop()  # SIGTERM: Mosquitto publishes every will, then exits
        grid_broker.start()
        assert grid_broker.port == port
        wait_back(grid, coordinator, epoch, ["w1", "w2"], time.time())
        for wid in ("w1", "w2"):
            assert "lost" not in states_seen(grid, wid), (wid, states_seen(grid, wid))
            record = grid.store.get_worker(wid)
            assert record is not None
            assert record.state == WorkerState.ONLINE
        reservation = grid.store.get_reservation(held.id)
        assert reservation is not None
        assert reservation.state == ReservationState.ACTIVE, reservation.ended_reason

    # The holder renews on and keeps working on its worker.
    renewed = held.expires_at
    wait_for(lambda: held.expires_at > renewed, 10, message="a renewal after the restarts")
    assert not held.ended
    assert held.run("echo still-here").text == "still-here\n"

    # A real death is still noticed, by its last will.
    killed_at = time.monotonic()
    killed.kill()
    lost = grid.wait_worker("w2", "lost", timeout=15)
    measurements("lost_after_sigkill", time.monotonic() - killed_at)
    assert lost.state_reason == "connection lost"
    assert states_seen(grid, "w1").count("lost") == 0
    held.release()


@MOSQUITTO
def test_a_killed_worker_is_lost_by_its_confirmed_last_will(
    grid: GridHarness, measurements: Measure,
) -> None:
    """With a heartbeat deadline a minute away, only the confirmed will can say "lost"."""
    grid.start_coordinator(will_confirm_s=0.5)
    worker = grid.start_worker("w-kill", heartbeat_s=30.0, in_subprocess=True)
    killed_at = time.monotonic()
    worker.kill()
    lost = grid.wait_worker("w-kill", "lost", timeout=15)
    measurements("lost_after_sigkill_by_will", time.monotonic() - killed_at)
    assert lost.state_reason == "connection lost"


@pytest.mark.parametrize("broker_kind", ["amqtt", "mosquitto"], indirect=True)
def test_an_outage_longer_than_the_lease_ends_no_reservation(
    grid: GridHarness, grid_broker: BrokerHandle, measurements: Measure,
) -> None:
    coordinator = grid.start_coordinator(reconnect_grace_s=GRACE_S)
    grid.start_worker("w1")
    alice = grid.client("alice", "client")
    held = alice.reserve("w1", lease_s=5.0)
    epoch = coordinator.bus.link_state().epoch

    stopped = time.time()
    grid_broker.stop()
    wait_for(lambda: not coordinator.bus.connected.is_set(), 10,
             message="the coordinator noticed the broker is gone")
    assert coordinator.reservations._timers.held_for() == float("inf")
    # The outage: until the lease has run out by the clock, and a bit more.
    out_until = held.expires_at + 2.0
    wait_for(lambda: time.time() > out_until, 30, interval=0.2,
             message="the lease ran out during the outage")
    grid_broker.start()
    back = time.time()
    wait_for(lambda: coordinator.bus.link_state().epoch > epoch, 20,
             message="coordinator reconnected")
    measurements("coordinator_reconnect_after_outage", time.time() - back)
    wait_back(grid, coordinator, epoch, ["w1"], back)
    measurements("outage_s", back - stopped)

    wait_for(lambda: held.expires_at > back, 15, message="the holder renewed after the outage")
    reservation = grid.store.get_reservation(held.id)
    assert reservation is not None
    assert reservation.state == ReservationState.ACTIVE, reservation.ended_reason
    assert not held.ended
    assert held.run("echo after-the-outage").text == "after-the-outage\n"
    assert grid.store.get_worker("w1").state == WorkerState.ONLINE  # type: ignore[union-attr]


@MOSQUITTO
def test_after_the_grace_an_unrenewed_lease_ends(grid: GridHarness,
                                                 grid_broker: BrokerHandle) -> None:
    """The pause holds deadlines back, it does not cancel them: a lease nobody renews
    after the outage ends once the grace is over."""
    coordinator = grid.start_coordinator(reconnect_grace_s=1.0)
    w1 = grid.fake_worker("w1")
    w1.join(heartbeat_s=3600.0)
    alice = grid.client("alice", "client")
    held = alice.reserve("w1", lease_s=5.0)
    held._keeper.stop()  # a holder that never renews
    epoch = coordinator.bus.link_state().epoch
    grid_broker.stop()
    wait_for(lambda: time.time() > held.expires_at + 0.5, 30, interval=0.2,
             message="the lease ran out during the outage")
    reservation = grid.store.get_reservation(held.id)
    assert reservation is not None
    assert reservation.state == ReservationState.ACTIVE
    grid_broker.start()
    wait_for(lambda: coordinator.bus.link_state().epoch > epoch, 20,
             message="coordinator reconnected")
    wait_for(lambda: (r := grid.store.get_reservation(held.id)) is not None
             and r.state == ReservationState.ENDED, 15, message="the lease ended after the grace")
    ended = grid.store.get_reservation(held.id)
    assert ended is not None
    assert ended.ended_reason == "lease expired"
