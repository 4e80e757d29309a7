"""Mosquitto export: file format, and the real ``mosquitto`` binary enforcing it."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import stat
import subprocess
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

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
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
    with pytest.raises(ValueError):
        render_passwd([(Principal(bad_id, Role.CLIENT), hash_token("x"))])
    with pytest.raises(ValueError):
        render_acl([Principal(bad_id, Role.CLIENT)], "xcloud")


def test_duplicates_and_foreign_hashes_are_refused() -> None:
    p = Principal("alice", Role.CLIENT)
    with pytest.raises(ValueError):
        render_passwd([(p, hash_token("a")), (p, hash_token("b"))])
    with pytest.raises(ValueError):
        render_passwd([(p, "$6$salt$crypt")])
    with pytest.raises(ValueError):
        render_acl([p, p], "xcloud")


# -- the real broker ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MosquittoProcess:
    """A real mosquitto on a free 127.0.0.1 port with our exported files."""

    def __init__(self, directory: Path, passwd: Path, acl: Path) -> None:
        self.port = _free_port()
        self.log_path = directory / "mosquitto.log"
        conf = directory / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {passwd}",
            f"acl_file {acl}",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto', who cannot read 0600 files
        conf.write_text("\n".join(lines) + "\n")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=self._log, stderr=subprocess.STDOUT
        )
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(T)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(T)
        self._log.close()


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

        def on_connect(cl: mqtt.Client, ud: Any, flags: Any, rc: Any, props: Any) -> None:
            self.rc = rc
            self.connected.set()

        self.c.on_connect = on_connect
        self.c.on_message = lambda cl, ud, m: self.messages.put((m.topic, bytes(m.payload)))
        self.c.on_subscribe = lambda cl, ud, mid, rcs, props: self.subacks.put(list(rcs))
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
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    if not os.path.exists(MOSQUITTO):
        if os.environ.get("XCLOUD_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{MOSQUITTO} is required (XCLOUD_REQUIRE_SERVICES=1) but missing")
        pytest.skip("mosquitto not installed")
    passwd, acl = write_mosquitto_files(principals(), "xcloud", tmp_path / "export")
    proc = MosquittoProcess(tmp_path, passwd, acl)
    yield proc
    proc.stop()


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
