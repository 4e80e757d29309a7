"""Mosquitto export: file format, and the real ``mosquitto`` binary enforcing it."""

from __future__ import annotations

import queue
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.acl import Acl, Principal, Role
from broker.credentials import hash_token
from broker.mosquitto import render_acl, render_passwd, write_mosquitto_files
from tests.fixtures.services import MosquittoFactory, MosquittoProcess

T = 5.0
QUIET = 0.5

TOKENS = {
    "coord": "coord-token",
    "alice": "alice-token",
    "bob": "bob-token",
    "w1": "w1-token",
    "w2": "w2-token",
}
ROLES = {
    "coord": Role.COORDINATOR,
    "alice": Role.CLIENT,
    "bob": Role.CLIENT,
    "w1": Role.WORKER,
    "w2": Role.WORKER,
}


def principals() -> list[tuple[Principal, str]]:
    return [(Principal(u, ROLES[u]), hash_token(t)) for u, t in TOKENS.items()]


# -- export format (no broker needed) ----------------------------------------------------


def test_files_are_written_private_and_complete(tmp_path: Path) -> None:
    passwd, acl = write_mosquitto_files(principals(), "xcloud", tmp_path / "out")
    for path in (passwd, acl):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = passwd.read_text().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == list(TOKENS)
    assert all(line.split(":", 1)[1].startswith("$7$101$") for line in lines)
    text = acl.read_text()
    alice_block = (
        "user alice\n"
        "topic write xcloud/coord/inbox/alice\n"
        "topic write xcloud/worker/+/inbox/alice\n"
    )
    assert alice_block in text
    assert "user coord\ntopic readwrite xcloud/#\ntopic read $SYS/#\n" in text
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_acl_file_matches_acl_rules() -> None:
    acl = Acl("grid")
    ps = [Principal(u, ROLES[u]) for u in TOKENS] + [Principal("root", Role.ADMIN)]
    blocks: dict[str, tuple[set[str], set[str]]] = {}
    user = ""
    for line in render_acl(ps, "grid").splitlines():
        if line.startswith("user "):
            user = line[5:]
            blocks[user] = (set(), set())
        elif line.startswith("topic "):
            _, access, topic = line.split(" ", 2)
            if access in ("write", "readwrite"):
                blocks[user][0].add(topic)
            if access in ("read", "readwrite"):
                blocks[user][1].add(topic)
    for p in ps:
        pub, sub = acl.rules(p)
        assert blocks[p.id] == (set(pub), set(sub)), p


@pytest.mark.parametrize("bad_id", ["a:b", "a b", "tab\there"])
def test_ids_mosquitto_cannot_represent_are_refused(bad_id: str) -> None:
    with pytest.raises(ValueError, match="cannot be exported to Mosquitto"):
        render_passwd([(Principal(bad_id, Role.CLIENT), hash_token("x"))])
    with pytest.raises(ValueError, match="cannot be exported to Mosquitto"):
        render_acl([Principal(bad_id, Role.CLIENT)], "xcloud")


def test_duplicates_and_foreign_hashes_are_refused() -> None:
    p = Principal("alice", Role.CLIENT)
    with pytest.raises(ValueError, match="listed twice"):
        render_passwd([(p, hash_token("a")), (p, hash_token("b"))])
    with pytest.raises(ValueError, match=r"not a Mosquitto \$7\$ hash"):
        render_passwd([(p, "$6$salt$crypt")])
    with pytest.raises(ValueError, match="listed twice"):
        render_acl([p, p], "xcloud")


# -- the real broker ---------------------------------------------------------------------


class Client:
    def __init__(
        self,
        port: int,
        user: str | None,
        token: str | None,
        *,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or user or "anon")
        self.c.reconnect_delay_set(30, 60)
        if user is not None:
            self.c.username_pw_set(user, token)
        if will is not None:
            self.c.will_set(will[0], will[1], 1, True)
        self.connected = threading.Event()
        self.rc: Any = None
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()

        def on_connect(_cl: mqtt.Client, _ud: Any, _flags: Any, rc: Any, _props: Any) -> None:
            self.rc = rc
            self.connected.set()

        self.c.on_connect = on_connect
        self.c.on_message = lambda _cl, _ud, m: self.messages.put((m.topic, bytes(m.payload)))
        self.c.on_subscribe = lambda _cl, _ud, _mid, rcs, _props: self.subacks.put(list(rcs))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.connected.wait(T), "no CONNACK"

    @property
    def ok(self) -> bool:
        return self.rc is not None and not self.rc.is_failure

    def subscribe(self, topic: str) -> list[Any]:
        self.c.subscribe(topic, 1)
        return self.subacks.get(timeout=T)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(T)

    def expect(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=T)

    def nothing(self) -> list[tuple[str, bytes]]:
        time.sleep(QUIET)
        return list(self.messages.queue)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def mosquitto(mosquitto_factory: MosquittoFactory, tmp_path: Path) -> MosquittoProcess:
    """A real Mosquitto with our exported files (tests/fixtures/services.py starts it)."""
    passwd, acl = write_mosquitto_files(principals(), "xcloud", tmp_path / "export")
    return mosquitto_factory(allow_anonymous=False, password_file=passwd, acl_file=acl)


@pytest.fixture
def connect(mosquitto: MosquittoProcess) -> Iterator[Any]:
    made: list[Client] = []

    def make(user: str | None, token: str | None = None, **kw: Any) -> Client:
        cl = Client(mosquitto.port, user, token, **kw)
        made.append(cl)
        return cl

    yield make
    for cl in made:
        cl.close()


@pytest.mark.mosquitto
@pytest.mark.integration
def test_our_hashes_authenticate_with_real_mosquitto(connect: Any) -> None:
    assert connect("alice", TOKENS["alice"]).ok
    assert connect("w1", TOKENS["w1"]).ok
    assert connect("alice", "wrong", client_id="a-wrong").rc == "Not authorized"
    assert connect("mallory", "x").rc == "Not authorized"
    assert connect(None).rc == "Not authorized"


@pytest.mark.mosquitto
@pytest.mark.integration
def test_inbox_slot_rule_enforced_by_mosquitto(connect: Any) -> None:
    coord = connect("coord", TOKENS["coord"])
    bob = connect("bob", TOKENS["bob"])
    alice = connect("alice", TOKENS["alice"])
    coord.subscribe("xcloud/coord/inbox/+")
    bob.subscribe("xcloud/client/bob/inbox/+")
    alice.publish("xcloud/coord/inbox/bob", b"forged")
    alice.publish("xcloud/client/bob/inbox/coord", b"forged")
    alice.publish("xcloud/coord/inbox/alice", b"genuine")
    assert coord.expect() == ("xcloud/coord/inbox/alice", b"genuine")
    assert coord.nothing() == []
    assert bob.nothing() == []


@pytest.mark.mosquitto
@pytest.mark.integration
def test_worker_status_and_wide_subscriptions(connect: Any) -> None:
    alice = connect("alice", TOKENS["alice"])
    # Mosquitto grants any subscription (no SUBACK failure) but checks "read" on
    # every delivery, so a wide filter still yields only what alice may read.
    alice.subscribe("xcloud/#")
    w1 = connect("w1", TOKENS["w1"])
    coord = connect("coord", TOKENS["coord"])
    w1.publish("xcloud/worker/w2/status", b"offline")  # another worker's status
    coord.publish("xcloud/client/bob/inbox/coord", b"for bob")
    coord.publish("xcloud/worker/w1/inbox/coord", b"for w1")
    w1.publish("xcloud/worker/w1/status", b"online")
    assert alice.expect() == ("xcloud/worker/w1/status", b"online")
    assert alice.nothing() == []


@pytest.mark.mosquitto
@pytest.mark.integration
def test_forbidden_will_is_never_published(connect: Any) -> None:
    bob = connect("bob", TOKENS["bob"])
    bob.subscribe("xcloud/worker/+/status")
    # Mosquitto accepts the CONNECT (the embedded broker refuses it) but drops the will.
    rogue = connect(
        "alice", TOKENS["alice"], client_id="rogue", will=("xcloud/worker/w1/status", b"offline")
    )
    assert rogue.ok
    rogue.c.loop_stop()
    sock = rogue.c.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    honest = connect("w2", TOKENS["w2"], will=("xcloud/worker/w2/status", b"offline"))
    honest.c.loop_stop()
    sock = honest.c.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    assert bob.expect() == ("xcloud/worker/w2/status", b"offline")
    assert bob.nothing() == []


@pytest.mark.mosquitto
@pytest.mark.integration
def test_transfer_segments_follow_the_sender_rule(connect: Any) -> None:
    """Segments (docs/transfer.md): published under one's own id only, read only by the
    destination (Mosquitto grants any subscription but checks every delivery)."""
    coord = connect("coord", TOKENS["coord"])
    alice = connect("alice", TOKENS["alice"])
    bob = connect("bob", TOKENS["bob"])
    w1 = connect("w1", TOKENS["w1"])
    w2 = connect("w2", TOKENS["w2"])
    coord.subscribe("xcloud/coord/xfer/+/+/+/+")
    alice.subscribe("xcloud/client/alice/xfer/#")
    w1.subscribe("xcloud/worker/w1/xfer/#")
    bob.subscribe("xcloud/client/alice/xfer/#")  # another client's downloads
    bob.subscribe("xcloud/coord/xfer/#")  # everyone's uploads
    w2.subscribe("xcloud/worker/w1/xfer/#")  # another worker's
    alice.publish("xcloud/coord/xfer/bob/tid0001/0/00000000", b"forged sender")
    alice.publish("xcloud/client/bob/xfer/alice/tid0001/0/00000000", b"client to client")
    w2.publish("xcloud/worker/w1/xfer/w2/tid0001/0/00000000", b"worker to worker")
    alice.publish("xcloud/worker/w1/xfer/alice/tid0001/0/00000000", b"put")
    w1.publish("xcloud/client/alice/xfer/w1/tid0002/0/00000000", b"get")
    alice.publish("xcloud/coord/xfer/alice/tid0003/0/00000000", b"upload")
    assert w1.expect() == ("xcloud/worker/w1/xfer/alice/tid0001/0/00000000", b"put")
    assert alice.expect() == ("xcloud/client/alice/xfer/w1/tid0002/0/00000000", b"get")
    assert coord.expect() == ("xcloud/coord/xfer/alice/tid0003/0/00000000", b"upload")
    for cl in (coord, alice, w1, bob, w2):
        assert cl.nothing() == []
