"""The embedded amqtt broker end to end, through real paho-mqtt clients and raw sockets.

Besides the basics (auth, ACL, retained, will, WebSocket, port in use), each hardening
override in ``broker.embedded._XcloudAmqttBroker`` has a test here that fails on plain
amqtt 0.12.1.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.acl import Principal, Role
from broker.credentials import hash_token, verify_token
from broker.embedded import BrokerSettings, EmbeddedBroker
from broker.errors import BrokerError, PortInUseError

pytestmark = pytest.mark.integration

T = 5.0  # generous timeout for anything that should happen "at once"
QUIET = 0.5  # how long we listen to assert that something does NOT arrive

USERS: dict[str, tuple[str, Role]] = {
    "coord": ("coord-token", Role.COORDINATOR),
    "alice": ("alice-token", Role.CLIENT),
    "bob": ("bob-token", Role.CLIENT),
    "root": ("root-token", Role.ADMIN),
    "w1": ("w1-token", Role.WORKER),
    "w2": ("w2-token", Role.WORKER),
}
HASHES = {user: (hash_token(tok), role) for user, (tok, role) in USERS.items()}


def tok(user: str) -> str:
    return USERS[user][0]


class Directory:
    """A stand-in for the coordinator's store: only hashes, and a call counter."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None  # when set, "slow" blocks on it

    def __call__(self, user: str, token: str) -> Principal | None:
        with self.lock:
            self.calls += 1
        if user == "slow" and self.gate is not None:
            self.gate.wait(T)
            return Principal("slow", Role.CLIENT) if token == "slow-token" else None
        if user == "boom":
            raise RuntimeError("database down")
        entry = HASHES.get(user)
        if entry is None or not verify_token(token, entry[0]):
            return None
        return Principal(user, entry[1])


@dataclass
class Conn:
    """A paho client plus the events tests wait on."""

    client: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    rc: Any = None
    session_present: bool | None = None
    messages: queue.Queue[mqtt.MQTTMessage] = field(default_factory=queue.Queue)
    subacks: queue.Queue[list[Any]] = field(default_factory=queue.Queue)

    @property
    def ok(self) -> bool:
        return self.rc is not None and not self.rc.is_failure

    def subscribe(self, topic: str, qos: int = 1) -> list[Any]:
        self.client.subscribe(topic, qos)
        return self.subacks.get(timeout=T)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(T)

    def expect(self, timeout: float = T) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def nothing(self, timeout: float = QUIET) -> list[tuple[str, bytes]]:
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                break
            got.append((m.topic, bytes(m.payload)))
        return got


class Clients:
    """Factory of paho clients against one broker; closes them all at teardown."""

    def __init__(self, port: int, ws_port: int | None = None) -> None:
        self.port = port
        self.ws_port = ws_port
        self.all: list[Conn] = []

    @classmethod
    def of(cls, broker: EmbeddedBroker) -> Clients:
        return cls(broker.port, broker.ws_port)

    def connect(
        self,
        user: str | None,
        token: str | None = None,
        *,
        client_id: str | None = None,
        clean: bool = True,
        will: tuple[str, bytes, int, bool] | None = None,
        transport: str = "tcp",
        keepalive: int = 30,
    ) -> Conn:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or user or "",
            clean_session=clean,
            transport=transport,  # type: ignore[arg-type]
        )
        c.reconnect_delay_set(30, 60)  # refused connects must not retry during a test
        if user is not None:
            c.username_pw_set(user, token)
        if will is not None:
            c.will_set(will[0], will[1], will[2], will[3])
        conn = Conn(c)

        def on_connect(cl: mqtt.Client, ud: Any, flags: Any, rc: Any, props: Any) -> None:
            conn.rc = rc
            conn.session_present = flags.session_present
            conn.connected.set()

        c.on_connect = on_connect
        c.on_disconnect = lambda *a: conn.disconnected.set()
        c.on_message = lambda cl, ud, m: conn.messages.put(m)
        c.on_subscribe = lambda cl, ud, mid, rcs, props: conn.subacks.put(list(rcs))
        port = self.ws_port if transport == "websockets" else self.port
        assert port is not None
        c.connect("127.0.0.1", port, keepalive=keepalive)
        c.loop_start()
        self.all.append(conn)
        assert conn.connected.wait(T), "no CONNACK"
        return conn

    def close(self) -> None:
        for conn in self.all:
            try:
                conn.client.disconnect()
            finally:
                conn.client.loop_stop()


@pytest.fixture
def directory() -> Directory:
    return Directory()


@pytest.fixture
def make_broker(directory: Directory) -> Iterator[Callable[..., EmbeddedBroker]]:
    started: list[EmbeddedBroker] = []

    def make(**kw: Any) -> EmbeddedBroker:
        kw.setdefault("port", 0)
        b = EmbeddedBroker(BrokerSettings(**kw), directory)
        b.start_in_thread()
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop_in_thread()


@pytest.fixture
def broker(make_broker: Callable[..., EmbeddedBroker]) -> EmbeddedBroker:
    return make_broker()


@pytest.fixture
def clients(broker: EmbeddedBroker) -> Iterator[Clients]:
    cs = Clients.of(broker)
    yield cs
    cs.close()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    yield
    deadline = time.monotonic() + T
    while time.monotonic() < deadline:
        left = [t.name for t in threading.enumerate() if t.name.startswith("xcloud-broker")]
        if not left:
            return
        time.sleep(0.05)
    pytest.fail(f"broker threads leaked: {left}")


# -- raw MQTT for what paho will not do (stay silent, bad topics, vanish mid-flow) -----


def _s(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    n, enc = len(body), bytearray()
    while True:
        byte, n = n % 128, n // 128
        enc.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes([first]) + bytes(enc) + body


def raw_connect(
    port: int,
    client_id: str,
    user: str,
    token: str,
    *,
    keepalive: int = 30,
    will: tuple[str, bytes] | None = None,
) -> socket.socket:
    flags = 0x80 | 0x40 | 0x02
    payload = _s(client_id)
    if will is not None:
        flags |= 0x04 | 0x08  # will, QoS 1
        payload += _s(will[0]) + struct.pack("!H", len(will[1])) + will[1]
    payload += _s(user) + _s(token)
    body = _s("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
    sock = socket.create_connection(("127.0.0.1", port), timeout=T)
    sock.sendall(_packet(0x10, body))
    connack = sock.recv(4)
    assert connack[:2] == b"\x20\x02" and connack[3] == 0, connack
    return sock


def raw_publish(sock: socket.socket, topic: str, payload: bytes, qos: int = 0) -> None:
    body = _s(topic) + (struct.pack("!H", 1) if qos else b"") + payload
    sock.sendall(_packet(0x30 | (qos << 1), body))


def wait_closed(sock: socket.socket, timeout: float) -> float:
    """Seconds until the broker closes ``sock`` (reads and discards anything sent)."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    while True:
        try:
            if not sock.recv(65536):
                return time.monotonic() - t0
        except ConnectionResetError:
            return time.monotonic() - t0


# -- authentication ----------------------------------------------------------------------


def test_anonymous_is_refused(clients: Clients) -> None:
    conn = clients.connect(None, client_id="anon")
    assert conn.rc == "Not authorized"


def test_wrong_token_is_refused(clients: Clients) -> None:
    assert clients.connect("alice", "nope").rc == "Not authorized"
    assert clients.connect("alice", None, client_id="alice-nopw").rc == "Not authorized"
    assert clients.connect("mallory", "x").rc == "Not authorized"


def test_good_token_is_accepted(clients: Clients) -> None:
    assert clients.connect("alice", tok("alice")).ok


def test_usernames_that_are_not_topic_levels_are_refused(
    clients: Clients, directory: Directory
) -> None:
    assert clients.connect("a/b", "x", client_id="slash").rc == "Not authorized"
    assert directory.calls == 0  # refused before the authenticator is asked


def test_authenticator_errors_refuse_the_connect(clients: Clients) -> None:
    assert clients.connect("boom", "x").rc == "Not authorized"
    assert clients.connect("alice", tok("alice")).ok


def test_successful_logins_are_cached(clients: Clients, directory: Directory) -> None:
    for i in range(3):
        assert clients.connect("alice", tok("alice"), client_id=f"a{i}").ok
    assert directory.calls == 1
    for i in range(2):
        assert clients.connect("bob", "wrong", client_id=f"b{i}").rc == "Not authorized"
    assert directory.calls == 3  # failures are never cached


def test_slow_authenticator_does_not_block_the_broker(
    clients: Clients, directory: Directory
) -> None:
    directory.gate = threading.Event()
    slow_result: list[Any] = []
    slow = threading.Thread(
        target=lambda: slow_result.append(clients.connect("slow", "slow-token"))
    )
    slow.start()
    try:
        coord = clients.connect("coord", tok("coord"))
        alice = clients.connect("alice", tok("alice"))
        assert coord.ok and alice.ok
        alice.subscribe("xcloud/client/alice/inbox/+")
        coord.publish("xcloud/client/alice/inbox/coord", b"while slow")
        assert alice.expect().payload == b"while slow"
        assert slow.is_alive()  # still waiting in the authenticator
    finally:
        directory.gate.set()
        slow.join(T)
    assert slow_result and slow_result[0].ok


def test_anonymous_mode(make_broker: Callable[..., EmbeddedBroker]) -> None:
    b = make_broker(allow_anonymous=True)
    cs = Clients.of(b)
    try:
        anon = cs.connect(None, client_id="anon")
        assert anon.ok
        coord = cs.connect("coord", tok("coord"))
        coord.subscribe("xcloud/coord/inbox/+")
        anon.publish("xcloud/coord/inbox/anonymous", b"hello")
        assert coord.expect().topic == "xcloud/coord/inbox/anonymous"
        named = cs.connect("guest", None, client_id="guest")
        assert named.ok
        named.publish("xcloud/coord/inbox/guest", b"hi")
        assert coord.expect().topic == "xcloud/coord/inbox/guest"
        # an anonymous client is only a client: no worker status, no other slots
        coord.subscribe("xcloud/worker/+/status")
        named.publish("xcloud/worker/w1/status", b"online")
        named.publish("xcloud/coord/inbox/coord", b"forged")
        assert coord.nothing() == []
        # a presented wrong token is still refused
        assert cs.connect("alice", "wrong", client_id="a-wrong").rc == "Not authorized"
    finally:
        cs.close()


# -- ACL end to end ------------------------------------------------------------------------


def test_publishing_into_another_senders_slot_is_not_delivered(clients: Clients) -> None:
    coord = clients.connect("coord", tok("coord"))
    bob = clients.connect("bob", tok("bob"))
    alice = clients.connect("alice", tok("alice"))
    coord.subscribe("xcloud/coord/inbox/+")
    bob.subscribe("xcloud/client/bob/inbox/+")
    alice.publish("xcloud/coord/inbox/bob", b"forged")  # impersonating bob
    alice.publish("xcloud/client/bob/inbox/coord", b"forged")  # impersonating the coordinator
    alice.publish("xcloud/coord/inbox/alice", b"genuine")
    msg = coord.expect()
    assert (msg.topic, msg.payload) == ("xcloud/coord/inbox/alice", b"genuine")
    assert coord.nothing() == []
    assert bob.nothing() == []


def test_worker_cannot_publish_another_workers_status(clients: Clients) -> None:
    alice = clients.connect("alice", tok("alice"))
    alice.subscribe("xcloud/worker/+/status")
    w1 = clients.connect("w1", tok("w1"))
    w1.publish("xcloud/worker/w2/status", b"offline")
    w1.publish("xcloud/worker/w1/status", b"online")
    msg = alice.expect()
    assert (msg.topic, msg.payload) == ("xcloud/worker/w1/status", b"online")
    assert alice.nothing() == []


def test_wide_subscription_is_refused_and_leaks_nothing(clients: Clients) -> None:
    alice = clients.connect("alice", tok("alice"))
    rcs = alice.subscribe("xcloud/#")
    assert len(rcs) == 1 and rcs[0].is_failure
    assert alice.subscribe("xcloud/client/+/inbox/+")[0].is_failure
    assert alice.subscribe("$SYS/#")[0].is_failure
    assert not alice.subscribe("xcloud/client/alice/inbox/+")[0].is_failure
    coord = clients.connect("coord", tok("coord"))
    coord.publish("xcloud/client/bob/inbox/coord", b"for bob")
    coord.publish("xcloud/worker/w1/inbox/coord", b"for w1")
    coord.publish("xcloud/client/alice/inbox/coord", b"for alice")
    assert alice.expect().payload == b"for alice"
    assert alice.nothing() == []


def test_qos1_delivery_and_admin_heartbeats(clients: Clients) -> None:
    root = clients.connect("root", tok("root"))
    assert not root.subscribe("xcloud/worker/+/heartbeat")[0].is_failure
    w1 = clients.connect("w1", tok("w1"))
    for i in range(20):
        w1.publish("xcloud/worker/w1/heartbeat", str(i).encode(), qos=1)
    assert [root.expect().payload for _ in range(20)] == [str(i).encode() for i in range(20)]


# -- retained messages ---------------------------------------------------------------------


def test_retained_status_reaches_a_later_subscriber(clients: Clients) -> None:
    w1 = clients.connect("w1", tok("w1"))
    w1.publish("xcloud/worker/w1/status", b"online", retain=True)
    w1.publish("xcloud/worker/w1/caps", b'{"cpus": 4}', retain=True)
    alice = clients.connect("alice", tok("alice"))
    alice.subscribe("xcloud/worker/+/status")
    msg = alice.expect()
    assert (msg.topic, msg.payload, msg.retain) == ("xcloud/worker/w1/status", b"online", True)
    assert alice.nothing() == []


def test_retained_messages_are_not_replayed_to_everyone_at_connect(clients: Clients) -> None:
    # amqtt 0.12.1 sends every newcomer the retained messages matching *any* client's
    # subscriptions; with the coordinator on xcloud/# that is the whole grid.
    coord = clients.connect("coord", tok("coord"))
    coord.subscribe("xcloud/#")
    w2 = clients.connect("w2", tok("w2"))
    w2.publish("xcloud/worker/w2/status", b"online", retain=True)
    bob = clients.connect("bob", tok("bob"))
    bob.publish("xcloud/coord/inbox/bob", b"bob's retained request", retain=True)
    w1 = clients.connect("w1", tok("w1"), client_id="w1-persistent", clean=False)
    assert w1.nothing() == []
    w1.subscribe("xcloud/worker/w1/inbox/+")
    w1.client.disconnect()
    w1.client.loop_stop()
    again = clients.connect("w1", tok("w1"), client_id="w1-persistent", clean=False)
    assert again.session_present
    assert again.nothing() == []


def test_retained_flag_in_an_inbox_is_delivered_but_not_stored(clients: Clients) -> None:
    coord = clients.connect("coord", tok("coord"))
    coord.subscribe("xcloud/coord/inbox/+")
    alice = clients.connect("alice", tok("alice"))
    alice.publish("xcloud/coord/inbox/alice", b"request", retain=True)
    assert coord.expect().payload == b"request"
    restarted = clients.connect("coord", tok("coord"), client_id="coord-2")
    restarted.subscribe("xcloud/coord/inbox/+")
    assert restarted.nothing() == []  # would be re-run after a coordinator restart


# -- last will and keep-alive -------------------------------------------------------------


def test_last_will_is_delivered_when_the_socket_dies(clients: Clients) -> None:
    alice = clients.connect("alice", tok("alice"))
    alice.subscribe("xcloud/worker/+/status")
    w1 = clients.connect("w1", tok("w1"), will=("xcloud/worker/w1/status", b"offline", 1, True))
    w1.publish("xcloud/worker/w1/status", b"online", retain=True)
    assert alice.expect().payload == b"online"
    w1.client.loop_stop()
    sock = w1.client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    msg = alice.expect()
    assert (msg.topic, msg.payload) == ("xcloud/worker/w1/status", b"offline")
    late = clients.connect("bob", tok("bob"))  # the will was retained
    late.subscribe("xcloud/worker/w1/status")
    assert late.expect().payload == b"offline"


def test_will_on_a_forbidden_topic_refuses_the_connect(clients: Clients) -> None:
    conn = clients.connect(
        "alice", tok("alice"), will=("xcloud/worker/w1/status", b"offline", 1, True)
    )
    assert conn.rc == "Not authorized"
    conn = clients.connect("w2", tok("w2"), will=("xcloud/worker/w1/status", b"offline", 1, True))
    assert conn.rc == "Not authorized"


def test_silent_client_is_dropped_after_keepalive_and_its_will_sent(
    broker: EmbeddedBroker, clients: Clients
) -> None:
    # amqtt 0.12.1 never disconnects a silent client, so a vanished worker's will
    # (its "offline" status) would never be published.
    alice = clients.connect("alice", tok("alice"))
    alice.subscribe("xcloud/worker/+/status")
    sock = raw_connect(
        broker.port,
        "w1-raw",
        "w1",
        tok("w1"),
        keepalive=1,
        will=("xcloud/worker/w1/status", b"lost"),
    )
    with sock:
        elapsed = wait_closed(sock, 10)
    assert 1.0 <= elapsed < 4.0
    assert alice.expect().payload == b"lost"


# -- sessions and client ids ---------------------------------------------------------------


@pytest.mark.parametrize("clean", [True, False])
def test_unauthenticated_connect_cannot_disturb_a_live_session(
    clients: Clients, clean: bool
) -> None:
    # amqtt 0.12.1 deletes (clean) or takes over (persistent) the session named by a
    # CONNECT's client id before checking the credentials.
    coord = clients.connect("coord", tok("coord"))
    alice = clients.connect("alice", tok("alice"), client_id="alice-1", clean=clean)
    alice.subscribe("xcloud/client/alice/inbox/+")
    intruder = clients.connect("alice", "guess", client_id="alice-1", clean=clean)
    assert intruder.rc == "Not authorized"
    coord.publish("xcloud/client/alice/inbox/coord", b"still here?")
    assert alice.expect().payload == b"still here?"
    assert not alice.disconnected.is_set()


def test_another_principal_cannot_take_over_a_client_id(clients: Clients) -> None:
    coord = clients.connect("coord", tok("coord"))
    alice = clients.connect("alice", tok("alice"), client_id="shared-id", clean=False)
    alice.subscribe("xcloud/client/alice/inbox/+")
    bob = clients.connect("bob", tok("bob"), client_id="shared-id", clean=False)
    assert bob.rc == "Client identifier not valid"
    coord.publish("xcloud/client/alice/inbox/coord", b"for alice")
    assert alice.expect().payload == b"for alice"
    assert bob.nothing() == []


def test_same_principal_reconnect_replaces_the_old_connection(clients: Clients) -> None:
    coord = clients.connect("coord", tok("coord"))
    old = clients.connect("alice", tok("alice"), client_id="alice-x")
    old.client.reconnect_delay_set(60, 120)
    new = clients.connect("alice", tok("alice"), client_id="alice-x")
    assert new.ok
    assert old.disconnected.wait(T)
    new.subscribe("xcloud/client/alice/inbox/+")
    coord.publish("xcloud/client/alice/inbox/coord", b"to the new one")
    assert new.expect().payload == b"to the new one"


# -- robustness ----------------------------------------------------------------------------


def test_oversized_payload_drops_the_connection(make_broker: Callable[..., EmbeddedBroker]) -> None:
    b = make_broker(max_payload=100_000)
    cs = Clients.of(b)
    try:
        coord = cs.connect("coord", tok("coord"))
        coord.subscribe("xcloud/coord/inbox/+")
        alice = cs.connect("alice", tok("alice"))
        alice.publish("xcloud/coord/inbox/alice", b"x" * 90_000)
        assert len(coord.expect().payload) == 90_000
        alice.client.publish("xcloud/coord/inbox/alice", b"x" * 200_000, qos=1)
        assert alice.disconnected.wait(T)
        assert coord.nothing() == []
        assert cs.connect("bob", tok("bob")).ok
    finally:
        cs.close()


def test_socket_without_connect_is_closed(make_broker: Callable[..., EmbeddedBroker]) -> None:
    # amqtt 0.12.1 waits for the first packet forever, holding the descriptor.
    b = make_broker(connect_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", b.port), timeout=T) as sock:
        assert 0.3 < wait_closed(sock, T) < T


def test_publish_to_invalid_topic_closes_the_connection_and_sends_the_will(
    broker: EmbeddedBroker, clients: Clients
) -> None:
    # amqtt 0.12.1 stops reading such a client but leaves it connected forever.
    alice = clients.connect("alice", tok("alice"))
    alice.subscribe("xcloud/worker/+/status")
    sock = raw_connect(
        broker.port, "w1-bad", "w1", tok("w1"), will=("xcloud/worker/w1/status", b"gone")
    )
    with sock:
        raw_publish(sock, "$SYS/owned", b"x", qos=1)
        assert wait_closed(sock, T) < T
    assert alice.expect().payload == b"gone"


def test_denied_publish_from_a_vanishing_client_does_not_hurt_the_broker(
    broker: EmbeddedBroker, clients: Clients
) -> None:
    coord = clients.connect("coord", tok("coord"))
    coord.subscribe("xcloud/coord/inbox/+")
    for i in range(20):
        sock = raw_connect(broker.port, f"bob-raw-{i}", "bob", tok("bob"))
        raw_publish(sock, "xcloud/coord/inbox/alice", b"forged", qos=1)
        raw_publish(sock, "xcloud/worker/w1/status", b"forged", qos=0)
        sock.close()
    alice = clients.connect("alice", tok("alice"))
    alice.publish("xcloud/coord/inbox/alice", b"genuine")
    assert coord.expect().payload == b"genuine"
    assert coord.nothing() == []


# -- listeners and lifecycle -------------------------------------------------------------


def test_websocket_listener(make_broker: Callable[..., EmbeddedBroker]) -> None:
    b = make_broker(ws_port=0)
    assert b.ws_port and b.ws_url == f"ws://127.0.0.1:{b.ws_port}"
    cs = Clients.of(b)
    try:
        assert (
            cs.connect("alice", "wrong", client_id="ws-bad", transport="websockets").rc
            == "Not authorized"
        )
        ws = cs.connect("alice", tok("alice"), transport="websockets")
        assert ws.ok
        ws.subscribe("xcloud/client/alice/inbox/+")
        coord = cs.connect("coord", tok("coord"))
        big = b"y" * (2 * 1024 * 1024)  # over websockets' default 1 MiB frame limit
        coord.publish("xcloud/client/alice/inbox/coord", big)
        assert ws.expect().payload == big
        ws.publish("xcloud/coord/inbox/alice", b"over ws")
    finally:
        cs.close()


def test_port_in_use_raises_a_clear_error(directory: Directory) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        b = EmbeddedBroker(BrokerSettings(port=port), directory)
        with pytest.raises(PortInUseError) as err:
            b.start_in_thread()
        assert err.value.port == port and err.value.host == "127.0.0.1"
        assert f"port {port} on 127.0.0.1 is already in use" in str(err.value)
        assert "--port" in str(err.value)
        assert isinstance(err.value, BrokerError)
        b.stop_in_thread()  # harmless after a failed start


def test_port_in_use_detected_on_the_websocket_port(directory: Directory) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        b = EmbeddedBroker(BrokerSettings(port=0, ws_port=port), directory)
        with pytest.raises(PortInUseError) as err:
            b.start_in_thread()
        assert err.value.port == port


def test_start_and_stop_inside_a_running_loop(directory: Directory) -> None:
    async def main() -> int:
        b = EmbeddedBroker(BrokerSettings(port=0), directory)
        await b.start()
        port = b.port
        assert b.url == f"mqtt://127.0.0.1:{port}"
        with pytest.raises(BrokerError):
            await b.start()
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()
        await b.stop()
        await b.stop()  # idempotent
        return port

    port = asyncio.run(main())
    with socket.socket() as s:  # the port was released
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_thread_hosted_broker_restarts_on_the_same_port(directory: Directory) -> None:
    b = EmbeddedBroker(BrokerSettings(port=0), directory)
    b.start_in_thread()
    port = b.port
    b.stop_in_thread()
    again = EmbeddedBroker(BrokerSettings(port=port), directory)
    with again:
        assert again.port == port
        cs = Clients.of(again)
        try:
            assert cs.connect("alice", tok("alice")).ok
        finally:
            cs.close()


def test_plugins_also_work_in_a_plain_amqtt_broker(directory: Directory) -> None:
    """The plugin route alone (amqtt 0.12 config: dotted class path -> Config fields).

    EmbeddedBroker adds its hardening on top; this pins that the plugins themselves
    authenticate and enforce the ACL when loaded by an unmodified amqtt Broker.
    """
    from amqtt.broker import Broker
    from amqtt.contexts import BrokerConfig, ListenerConfig

    from broker.acl import Acl
    from broker.embedded import _AuthCache, _Runtime

    async def main() -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="xcloud-broker-test") as executor:
            runtime = _Runtime(
                acl=Acl(),
                authenticator=directory,
                allow_anonymous=False,
                executor=executor,
                cache=_AuthCache(5.0),
            )
            config = BrokerConfig(
                listeners={"default": ListenerConfig(bind="127.0.0.1:0")},
                plugins={
                    "broker.embedded.XcloudAuthPlugin": {"runtime": runtime},
                    "broker.embedded.XcloudTopicPlugin": {"runtime": runtime},
                },
            )
            amqtt_broker = Broker(config)
            await amqtt_broker.start()
            try:
                server = amqtt_broker._servers["default"].instance
                port = server.sockets[0].getsockname()[1]
                await asyncio.to_thread(_exercise, port)
            finally:
                await amqtt_broker.shutdown()

    asyncio.run(main())


def _exercise(port: int) -> None:
    cs = Clients(port)
    try:
        assert cs.connect("alice", "wrong").rc == "Not authorized"
        coord = cs.connect("coord", tok("coord"))
        alice = cs.connect("alice", tok("alice"))
        assert alice.subscribe("xcloud/#")[0].is_failure
        alice.subscribe("xcloud/client/alice/inbox/+")
        coord.subscribe("xcloud/coord/inbox/+")
        alice.publish("xcloud/coord/inbox/bob", b"forged")
        alice.publish("xcloud/coord/inbox/alice", b"genuine")
        assert coord.expect().payload == b"genuine"
        coord.publish("xcloud/client/alice/inbox/coord", b"reply")
        assert alice.expect().payload == b"reply"
        assert coord.nothing() == []
    finally:
        cs.close()
