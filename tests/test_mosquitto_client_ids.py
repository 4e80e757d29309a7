"""Client ids on Mosquitto (issue 8, item 2).

Mosquitto gives a client id to whoever connects with it last: the earlier connection is
closed and, unless both sessions are persistent, its last will is published. Any
principal that knew a worker's or the coordinator's id (they were ``worker-<wid>`` and
``coordinator-<principal>``) could so kick it, have its will say it died, and end its
reservations. Mosquitto 2.0.11 cannot tie client ids to usernames without forcing one
connection per principal (``use_username_as_clientid``) or a plugin, so the MQTT id of
every named connection (workers, the coordinator, client sessions) is now secret: the
name plus a keyed hash of the principal's token (``broker.bus.private_client_id``). A
client's session name, which the worker it reserves learns, no longer lets that worker
kick it either. The embedded broker refuses another principal's id on top of this.
"""

from __future__ import annotations

import threading
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.bus import private_client_id
from coordinator.reservation_state import ReservationState
from schemas.messages import CoordStatus, WorkerStatus
from tests.fixtures.grid import COORDINATOR, GridHarness
from tests.fixtures.services import wait_for

pytestmark = [pytest.mark.integration]

MOSQUITTO = pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)


def test_private_client_ids_are_stable_and_need_the_token() -> None:
    first = private_client_id("worker-w1", "token-of-w1")
    assert first == private_client_id("worker-w1", "token-of-w1")  # a restart resumes
    name, _, digest = first.rpartition("-")
    assert name == "worker-w1"
    assert len(digest) == 32
    assert int(digest, 16) >= 0
    assert private_client_id("worker-w1", "another-token") != first
    assert private_client_id("worker-w2", "token-of-w1") != first
    assert "token-of-w1" not in first
    assert private_client_id("worker-w1", "") == "worker-w1"  # anonymous: nothing secret


def connect_as(grid: GridHarness, principal: str, role: str, client_id: str, *,
               clean: bool) -> mqtt.Client:
    """A raw MQTT connection as ``principal`` with ``client_id``; returns once accepted."""
    token = grid.token(principal, role)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=clean)
    client.username_pw_set(principal, token)
    client.reconnect_delay_set(30, 60)
    answered = threading.Event()
    result: list[Any] = []

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        result.append(rc)
        answered.set()

    client.on_connect = on_connect
    assert grid.broker is not None
    client.connect("127.0.0.1", grid.broker.port)
    client.loop_start()
    assert answered.wait(5), f"no CONNACK for {principal} as {client_id}"
    assert not result[0].is_failure, (principal, client_id, result[0])
    return client


@MOSQUITTO
def test_nobody_can_take_over_a_worker_or_the_coordinator(grid: GridHarness) -> None:
    coordinator = grid.start_coordinator()
    worker = grid.start_worker("w1")
    assert worker.agent is not None
    watcher = grid.watcher
    alice = grid.client("alice", "client")
    held = alice.reserve("w1")
    grid.add_principals(("mallory", "client"), ("evil", "worker"))
    victims = {"coordinator": coordinator.bus, "w1": worker.agent.bus, "alice": alice.bus}
    epochs = {name: bus.link_state().epoch for name, bus in victims.items()}
    assert worker.agent.bus.mqtt_client_id.startswith("worker-w1-")
    assert coordinator.bus.mqtt_client_id.startswith(f"coordinator-{COORDINATOR}-")
    assert alice.bus.mqtt_client_id != alice.session  # a worker learns the session id

    # Every id an attacker can predict or learn (a worker sees its holder's session in
    # reservation.open), as a client and as a worker principal, with a
    # clean session (which would publish the victim's will) and a persistent one (which
    # would take its session over).
    guesses = ["worker-w1", f"coordinator-{COORDINATOR}", "w1", COORDINATOR, alice.session]
    for principal, role in (("mallory", "client"), ("evil", "worker")):
        for client_id in guesses:
            for clean in (True, False):
                attacker = connect_as(grid, principal, role, client_id, clean=clean)
                attacker.disconnect()
                attacker.loop_stop()

    # Round trips through both victims after every attempt: a kicked victim could only
    # answer from a new connection (a new epoch).
    assert alice.ping().component is not None
    assert held.run("echo still-mine").text == "still-mine\n"
    for name, bus in victims.items():
        assert bus.link_state().epoch == epochs[name], f"{name} was disconnected"
        assert bus.connected.is_set()
    assert not [s for _, s in watcher.of(WorkerStatus) if s.state == "offline"]
    assert not [s for _, s in watcher.of(CoordStatus) if s.state == "down"]
    assert "lost" not in [e.new_state.value for e in grid.store.worker_events("w1")]
    reservation = grid.store.get_reservation(held.id)
    assert reservation is not None
    assert reservation.state == ReservationState.ACTIVE


@MOSQUITTO
def test_legitimate_connections_keep_working(grid: GridHarness) -> None:
    """Several connections of one client principal at once, and a worker that restarts
    and resumes its persistent session under the same (secret) id."""
    grid.start_coordinator()
    worker = grid.start_worker("w1")
    assert worker.agent is not None
    shell, cli = grid.client("alice", "client"), grid.client("alice", "client")
    assert shell.session != cli.session
    assert shell.ping().component is not None
    assert cli.ping().component is not None
    assert [w.id for w in cli.workers()] == ["w1"]
    assert shell.bus.link_state().epoch == 1
    assert cli.bus.link_state().epoch == 1

    first_id = worker.agent.bus.mqtt_client_id
    worker.stop()
    grid.wait_worker("w1", "offline")
    again = grid.start_worker("w1")
    assert again.agent is not None
    assert again.agent.bus.mqtt_client_id == first_id
    with shell.reserve("w1") as held:
        assert held.run("echo on-the-restarted-worker").text == "on-the-restarted-worker\n"
    wait_for(lambda: again.agent is not None and again.agent.bus.connected.is_set(), 5,
             message="the restarted worker stays connected")
