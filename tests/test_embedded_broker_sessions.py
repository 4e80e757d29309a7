"""The embedded amqtt broker: messages queued for an offline persistent session, and
revocation (``recheck_principals``, ``broker.recheck``) cutting live connections, through
real paho-mqtt clients and raw sockets (tests/fixtures/amqtt_clients.py)."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Callable

import pytest

from broker.acl import Role
from broker.bus import Bus, Incoming
from broker.config import BusConfig
from broker.embedded import BrokerSettings, EmbeddedBroker
from broker.errors import BrokerError
from broker.revocation import SenderRateLimit, SessionRecheck
from schemas.codec import encode, envelope
from schemas.messages import BrokerRecheck, CapsRefresh
from schemas.topics import Topics
from tests.fixtures.amqtt_clients import (  # noqa: F401 - fixtures, by name
    QUIET,
    Clients,
    Conn,
    Directory,
    T,
    broker,
    clients,
    directory,
    make_broker,
    no_leaked_broker_threads,
    tok,
)
from tests.fixtures.services import wait_for

pytestmark = pytest.mark.integration


# -- messages queued for an offline persistent session ---------------------------------


def _offline(broker: EmbeddedBroker, client_id: str) -> None:
    wait_for(lambda: client_id not in broker.connected_clients(), timeout=T,
             message=f"the broker sees {client_id} disconnected")


def test_queued_messages_reach_a_returning_persistent_session_unretained(
    broker: EmbeddedBroker, clients: Clients
) -> None:
    # amqtt 0.12.1 delivers what it queued for an offline session with RETAIN set.
    w1 = clients.connect("w1", tok("w1"), client_id="w1-queued", clean=False)
    w1.subscribe("xcloud/worker/w1/inbox/+")
    w1.client.disconnect()
    w1.client.loop_stop()
    _offline(broker, "w1-queued")
    coord = clients.connect("coord", tok("coord"))
    coord.publish("xcloud/worker/w1/inbox/coord", b"while you were away", qos=1)
    again = clients.connect("w1", tok("w1"), client_id="w1-queued", clean=False)
    assert again.session_present
    msg = again.expect()
    assert (msg.topic, msg.payload) == ("xcloud/worker/w1/inbox/coord", b"while you were away")
    assert msg.retain is False
    assert again.nothing() == []


def test_bus_inbox_handler_gets_what_was_queued_while_offline(
    broker: EmbeddedBroker, clients: Clients
) -> None:
    """The restarted-worker case: a request queued in its persistent session reaches the
    inbox handler (a Bus drops retained inbox messages, so RETAIN=1 would lose it)."""
    topics = Topics()
    config = BusConfig(url=broker.url, principal="w1", token=tok("w1"))

    def worker_bus() -> tuple[Bus, queue.Queue[Incoming]]:
        got: queue.Queue[Incoming] = queue.Queue()
        bus = Bus(config, client_id="w1-bus", inbox=topics.worker_inbox("w1"),
                  persistent_session=True)
        bus.on_inbox(CapsRefresh.TYPE, got.put)
        bus.start()
        return bus, got

    bus, _ = worker_bus()
    bus.stop()
    _offline(broker, "w1-bus")
    coord = clients.connect("coord", tok("coord"))
    coord.publish(topics.inbox_for(topics.worker_inbox("w1"), "coord"),
                  encode(envelope(CapsRefresh())), qos=1)
    bus, got = worker_bus()
    try:
        incoming = got.get(timeout=T)
        assert incoming.message.type == CapsRefresh.TYPE
        assert incoming.sender == "coord"
        assert incoming.retained is False
    finally:
        bus.stop()


# -- revocation: re-checking live sessions ------------------------------------------------


def _recheck(*principals: str) -> bytes:
    return encode(envelope(BrokerRecheck(principals=list(principals))))


RECHECK = Topics().broker_recheck


def test_recheck_from_the_coordinator_cuts_a_revoked_principal(
    clients: Clients, directory: Directory
) -> None:
    coord = clients.connect("coord", tok("coord"))
    alice = clients.connect("alice", tok("alice"))
    alice.subscribe("xcloud/client/alice/inbox/+")
    bob = clients.connect("bob", tok("bob"))
    bob.client.reconnect_delay_set(60, 120)
    directory.revoked.add("bob")
    coord.publish(RECHECK, _recheck("bob", "alice", "nobody"))
    assert bob.disconnected.wait(T), "the revoked principal is still connected"
    assert clients.connect("bob", tok("bob"), client_id="bob-again").rc == "Not authorized"
    # named too, but still valid: untouched
    coord.publish("xcloud/client/alice/inbox/coord", b"still here")
    assert alice.expect().payload == b"still here"
    assert not alice.disconnected.is_set()


def test_a_cut_worker_leaves_its_will(clients: Clients, directory: Directory) -> None:
    """A cut is the normal "connection lost" path: a worker's "offline" will goes out,
    so the coordinator learns at once that it is gone."""
    coord = clients.connect("coord", tok("coord"))
    alice = clients.connect("alice", tok("alice"))
    alice.subscribe("xcloud/worker/+/status")
    w1 = clients.connect("w1", tok("w1"), will=("xcloud/worker/w1/status", b"offline", 1, True))
    w1.client.reconnect_delay_set(60, 120)
    directory.revoked.add("w1")
    coord.publish(RECHECK, _recheck("w1"))
    assert w1.disconnected.wait(T)
    assert alice.expect().payload == b"offline"


def test_admin_may_trigger_a_recheck(clients: Clients, directory: Directory) -> None:
    root = clients.connect("root", tok("root"))
    bob = clients.connect("bob", tok("bob"))
    bob.client.reconnect_delay_set(60, 120)
    directory.revoked.add("bob")
    root.publish(RECHECK, _recheck("bob"))
    assert bob.disconnected.wait(T)


def test_clients_and_workers_cannot_trigger_a_recheck(
    clients: Clients, directory: Directory
) -> None:
    bob = clients.connect("bob", tok("bob"))
    bob.client.reconnect_delay_set(60, 120)
    directory.revoked.add("bob")
    alice = clients.connect("alice", tok("alice"))
    w1 = clients.connect("w1", tok("w1"))
    assert alice.subscribe(RECHECK)[0].is_failure
    assert w1.subscribe(RECHECK)[0].is_failure
    alice.publish(RECHECK, _recheck("bob"))
    w1.publish(RECHECK, _recheck("bob"))
    assert not bob.disconnected.wait(QUIET), "a client's or worker's recheck was obeyed"
    coord = clients.connect("coord", tok("coord"))
    coord.publish(RECHECK, _recheck("bob"))  # the same request, from one who may
    assert bob.disconnected.wait(T)


def test_recheck_trigger_is_not_routed_to_subscribers(clients: Clients) -> None:
    coord = clients.connect("coord", tok("coord"))
    root = clients.connect("root", tok("root"))
    assert not root.subscribe(RECHECK)[0].is_failure
    coord.subscribe("xcloud/#")
    coord.publish(RECHECK, _recheck("alice"))
    root.publish(RECHECK, _recheck("alice"))
    assert root.nothing() == []
    assert coord.nothing() == []


def test_invalid_recheck_messages_are_dropped(clients: Clients, directory: Directory) -> None:
    coord = clients.connect("coord", tok("coord"))
    bob = clients.connect("bob", tok("bob"))
    bob.client.reconnect_delay_set(60, 120)
    directory.revoked.add("bob")
    too_many = json.loads(_recheck("bob"))
    too_many["principals"] = ["bob"] + [f"p{i}" for i in range(64)]  # 65 > maxItems
    for bad in (b"not json", b'{"type": "broker.recheck"}', json.dumps(too_many).encode(),
                encode(envelope(CapsRefresh()))):
        coord.publish(RECHECK, bad)
    assert not bob.disconnected.wait(QUIET)
    coord.publish(RECHECK, _recheck("bob"))
    assert bob.disconnected.wait(T)


def test_recheck_principals_from_python(
    broker: EmbeddedBroker, clients: Clients, directory: Directory
) -> None:
    alice = clients.connect("alice", tok("alice"))
    bob = clients.connect("bob", tok("bob"))
    bob2 = clients.connect("bob", tok("bob"), client_id="bob-2")
    for conn in (bob, bob2):
        conn.client.reconnect_delay_set(60, 120)
    assert broker.connected_clients() == {"alice": "alice", "bob": "bob", "bob-2": "bob"}
    assert broker.recheck_principals(["alice", "bob"]) == 0  # nothing revoked yet
    directory.revoked.add("bob")
    assert broker.recheck_principals(["alice", "bob", "not/an id"]) == 2
    assert broker.recheck_principals(["bob"]) == 0  # cut once, counted once
    assert bob.disconnected.wait(T)
    assert bob2.disconnected.wait(T)
    wait_for(lambda: broker.connected_clients() == {"alice": "alice"}, timeout=T,
             message="both of bob's connections are cut")
    assert not alice.disconnected.is_set()
    assert broker.recheck_principals(["bob"]) == 0


def test_recheck_cuts_a_websocket_connection(
    make_broker: Callable[..., EmbeddedBroker], directory: Directory
) -> None:
    b = make_broker(ws_port=0)
    cs = Clients.of(b)
    try:
        bob = cs.connect("bob", tok("bob"), transport="websockets")
        bob.client.reconnect_delay_set(60, 120)
        directory.revoked.add("bob")
        assert b.recheck_principals(["bob"]) == 1
        assert bob.disconnected.wait(T)
        wait_for(lambda: b.connected_clients() == {}, timeout=T, message="bob is cut")
    finally:
        cs.close()


def test_recheck_cuts_a_principal_whose_role_changed(
    broker: EmbeddedBroker, clients: Clients, directory: Directory
) -> None:
    root = clients.connect("root", tok("root"))
    root.client.reconnect_delay_set(60, 120)
    assert not root.subscribe("xcloud/worker/+/heartbeat")[0].is_failure
    directory.roles["root"] = Role.CLIENT  # demoted: its admin subscriptions must go
    assert broker.recheck_principals(["root"]) == 1
    assert root.disconnected.wait(T)
    again = clients.connect("root", tok("root"), client_id="root-again")
    assert again.ok
    assert again.subscribe("xcloud/worker/+/heartbeat")[0].is_failure


def test_a_login_in_flight_during_a_recheck_is_checked_again(
    broker: EmbeddedBroker, clients: Clients, directory: Directory
) -> None:
    """The authenticator answered "valid" from before the revoke, but the session only
    went live after the recheck had looked for it: it is checked again once live."""
    directory.gate = threading.Event()
    result: list[Conn] = []
    connecting = threading.Thread(
        target=lambda: result.append(clients.connect("slow", "slow-token"))
    )
    connecting.start()
    try:
        assert directory.slow_waiting.wait(T)
        directory.revoked.add("slow")
        assert broker.recheck_principals(["slow"]) == 0  # not live yet
    finally:
        directory.gate.set()
        connecting.join(T)
    assert result
    assert result[0].ok  # the stale answer let the CONNECT through...
    assert result[0].disconnected.wait(T)  # ...but not for long
    wait_for(lambda: "slow" not in broker.connected_clients(), timeout=T,
             message="the stale login is cut")


def test_recheck_triggers_are_rate_limited_per_sender(
    clients: Clients, directory: Directory
) -> None:
    coord = clients.connect("coord", tok("coord"))
    clients.connect("alice", tok("alice"))
    before = directory.calls
    t0 = time.monotonic()
    for _ in range(200):
        coord.publish(RECHECK, _recheck("alice"))
    coord.nothing()  # let the broker finish what it accepted
    elapsed = time.monotonic() - t0
    accepted = SessionRecheck.BURST + SessionRecheck.RATE_PER_S * elapsed
    assert directory.calls - before <= accepted + 1, "each trigger cost an authenticator call"
    # another sender is not starved by the first one's flood
    bob = clients.connect("bob", tok("bob"))
    bob.client.reconnect_delay_set(60, 120)
    directory.revoked.add("bob")
    root = clients.connect("root", tok("root"))
    root.publish(RECHECK, _recheck("bob"))
    assert bob.disconnected.wait(T)


def test_sender_rate_limit() -> None:
    now = [0.0]
    limit = SenderRateLimit(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limit.allow("coord") for _ in range(4)] == [True, True, True, False]
    assert limit.allow("root")  # a bucket per sender
    now[0] += 0.5  # one token back
    assert limit.allow("coord")
    assert not limit.allow("coord")
    now[0] += 100  # refills only up to the burst
    assert [limit.allow("coord") for _ in range(4)] == [True, True, True, False]


def test_recheck_when_not_running(directory: Directory) -> None:
    b = EmbeddedBroker(BrokerSettings(port=0), directory)
    with pytest.raises(BrokerError, match="not running"):
        b.recheck_principals(["alice"])

    async def in_loop() -> None:
        await b.start()
        try:
            assert await b.recheck(["alice"]) == 0
            with pytest.raises(BrokerError, match="own loop"):
                b.recheck_principals(["alice"])
        finally:
            await b.stop()

    asyncio.run(in_loop())
