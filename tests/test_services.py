"""The service fixtures themselves work: real Mosquitto, MariaDB and Docker; and no test
skips except through ``require_service``."""

from __future__ import annotations

import ast
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.leaks import ThreadGuard
from tests.fixtures.services import (
    BUSYBOX_IMAGE,
    MariaDBServer,
    MosquittoProcess,
    find_executable,
    free_port,
    port_open,
    require_executable,
    require_service,
    wait_for,
    write_mosquitto_passwords,
)

TESTS = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------ helpers


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_free_port_fixture(free_port: int) -> None:
    assert isinstance(free_port, int)
    assert free_port > 0


def test_wait_for_returns_value() -> None:
    calls = iter([0, None, "", "ready"])
    assert wait_for(lambda: next(calls), timeout=5, interval=0.001) == "ready"


def test_wait_for_times_out_with_message() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError, match="never true"):
        wait_for(lambda: False, timeout=0.1, interval=0.01, message="never true")
    assert time.monotonic() - start < 2


def test_require_service_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XCLOUD_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_service("thing", "not here")
    monkeypatch.setenv("XCLOUD_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="thing"):
        require_service("thing", "not here")


def test_require_executable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_executable("sh") == find_executable("sh") is not None
    monkeypatch.delenv("XCLOUD_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-program-xcloud"):
        require_executable("no-such-program-xcloud")
    monkeypatch.setenv("XCLOUD_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="'tool' unavailable"):
        require_executable("no-such-program-xcloud", "tool")


def test_thread_guard_names_the_threads_left_running() -> None:
    guard = ThreadGuard()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="xcloud-test-leak", daemon=True)
    thread.start()
    try:
        assert guard.leaked() == [thread]
        assert ThreadGuard(prefix="other-").leaked() == []
        with pytest.raises(AssertionError, match="xcloud-test-leak"):
            guard.check(timeout=0.1)
    finally:
        stop.set()
        thread.join(5)
    guard.check(timeout=5)


def test_mariadb_url_parsing() -> None:
    server = MariaDBServer.from_url("mysql://u%40x:p%3Aw@127.0.0.1:3307")
    assert (server.user, server.password, server.port) == ("u@x", "p:w", 3307)
    assert server.url("db") == "mysql://u%40x:p%3Aw@127.0.0.1:3307/db"
    assert MariaDBServer.from_url("mysql://root@127.0.0.1").url() == "mysql://root@127.0.0.1:3306"


# ---------------------------------------------------------------------------- mosquitto


def _paho_client(**auth: str) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"test-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv311,
    )
    if auth:
        client.username_pw_set(auth["username"], auth.get("password"))
    return client


def _connect(client: Any, broker: MosquittoProcess) -> int:
    """Connect and return the CONNACK reason code (0 = accepted)."""
    result: dict[str, int] = {}
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        result["rc"] = reason.value
        done.set()

    client.on_connect = on_connect
    client.connect(broker.host, broker.port, keepalive=10)
    client.loop_start()
    wait_for(done.is_set, timeout=10, message="no CONNACK")
    return result["rc"]


@pytest.mark.mosquitto
def test_mosquitto_pubsub_round_trip(mosquitto: MosquittoProcess) -> None:
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert port_open(mosquitto.host, mosquitto.port)
    received: list[tuple[str, bytes]] = []
    subscribed = threading.Event()

    sub = _paho_client()
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.on_message = lambda _c, _u, msg: received.append((msg.topic, msg.payload))
    pub = _paho_client()
    try:
        assert _connect(sub, mosquitto) == 0
        sub.subscribe("xcloud-test/+/ping", qos=1)
        wait_for(subscribed.is_set, message="no SUBACK")
        assert _connect(pub, mosquitto) == 0
        pub.publish("xcloud-test/a/ping", b"hello", qos=1).wait_for_publish(5)
        wait_for(lambda: received, message="message not delivered")
        assert received == [("xcloud-test/a/ping", b"hello")]
    finally:
        for client in (sub, pub):
            client.disconnect()
            client.loop_stop()


@pytest.mark.mosquitto
def test_mosquitto_password_file(mosquitto_factory: Any, tmp_path: Path) -> None:
    passwords = write_mosquitto_passwords(tmp_path / "passwd", {"alice": "s3cret"})
    broker = mosquitto_factory(allow_anonymous=False, password_file=passwords)
    anonymous = _paho_client()
    wrong = _paho_client(username="alice", password="nope")
    right = _paho_client(username="alice", password="s3cret")
    try:
        assert _connect(anonymous, broker) != 0
        assert _connect(wrong, broker) != 0
        assert _connect(right, broker) == 0
    finally:
        for client in (anonymous, wrong, right):
            client.disconnect()
            client.loop_stop()


@pytest.mark.mosquitto
def test_mosquitto_kill_and_restart_same_port(mosquitto: MosquittoProcess) -> None:
    port, pid = mosquitto.port, mosquitto.pid
    mosquitto.kill()
    assert not mosquitto.running()
    assert not port_open("127.0.0.1", port)
    mosquitto.start()
    assert mosquitto.port == port
    assert mosquitto.pid != pid
    assert port_open("127.0.0.1", port)
    mosquitto.stop()
    assert not mosquitto.running()
    assert "mosquitto" in mosquitto.log_text()


# ------------------------------------------------------------------------------ mariadb


@pytest.mark.mariadb
def test_mariadb_url_database_is_usable(mariadb_url: str) -> None:
    server = MariaDBServer.from_url(mariadb_url)
    database = mariadb_url.rsplit("/", 1)[1]
    assert database.startswith("xcloud_test_")
    conn = server.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS t (id INT PRIMARY KEY, name VARCHAR(40))")
            cur.execute("REPLACE INTO t VALUES (1, 'one')")
            cur.execute("SELECT name FROM t WHERE id = 1")
            assert cur.fetchone() == ("one",)
    finally:
        conn.close()


@pytest.mark.mariadb
def test_fresh_mariadb_url_is_empty_and_dropped(
    fresh_mariadb_url: str, mariadb_server: MariaDBServer
) -> None:
    database = fresh_mariadb_url.rsplit("/", 1)[1]
    conn = mariadb_server.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW TABLES")
            assert cur.fetchall() == ()
            cur.execute("CREATE TABLE jobs (id INT PRIMARY KEY)")
            cur.execute("INSERT INTO jobs VALUES (7)")
            cur.execute("SELECT COUNT(*) FROM jobs")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()
    # Dropping is the fixture's teardown; check the helper the teardown uses.
    name = mariadb_server.create_database()
    mariadb_server.drop_database(name)
    conn = mariadb_server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW DATABASES LIKE %s", (name,))
            assert cur.fetchall() == ()
    finally:
        conn.close()


# ------------------------------------------------------------------------------- docker


@pytest.mark.docker
def test_docker_runs_busybox_without_network(docker_engine: Any, docker_image: Any) -> None:
    image = docker_image(BUSYBOX_IMAGE)
    output = docker_engine.containers.run(
        image,
        ["sh", "-c", "true && id -u && ls /sys/class/net"],
        network_mode="none",
        user="1000:1000",
        remove=True,
    )
    uid, *interfaces = output.decode().split()
    assert uid == "1000"
    assert interfaces == ["lo"]


@pytest.mark.docker
def test_docker_true_exit_code(docker_engine: Any, docker_image: Any) -> None:
    container = docker_engine.containers.run(
        docker_image(BUSYBOX_IMAGE), ["true"], network_mode="none", detach=True
    )
    try:
        assert container.wait(timeout=60)["StatusCode"] == 0
    finally:
        container.remove(force=True)


# -------------------------------------------------------------------------------- skips

#: The one place a test may skip: require_service, which fails instead of skipping under
#: XCLOUD_REQUIRE_SERVICES=1 (as in CI), so that in CI nothing skips.
SKIP_ALLOWED = {TESTS / "fixtures" / "services.py"}
#: Plain skips left in files still to be converted (to require_service, or to an
#: assertion); at most this many each, so none can be added there either. Drop an entry
#: once its file is converted.
NOT_YET_CONVERTED: dict[Path, int] = {}
SKIP_CALLS = {"skip", "importorskip", "skipTest"}
SKIP_MARKS = {"skip", "skipif", "skipIf", "skipUnless"}


def plain_skips(source: str, filename: str = "<test>") -> list[str]:
    """``file:line`` of every way ``source`` skips a test other than ``require_service``:
    ``pytest.skip(...)``, ``pytest.importorskip(...)``, ``pytest.mark.skip``/``skipif``,
    ``unittest.skip*``, ``self.skipTest(...)``, ``from pytest import skip``."""
    found: list[int] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            func = node.func
            name = (func.attr if isinstance(func, ast.Attribute)
                    else func.id if isinstance(func, ast.Name) else "")
            if name in SKIP_CALLS:
                found.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr in SKIP_MARKS:
            owner = node.value
            owner_name = (owner.attr if isinstance(owner, ast.Attribute)
                          else owner.id if isinstance(owner, ast.Name) else "")
            if owner_name in {"mark", "unittest"}:
                found.append(node.lineno)
        elif (isinstance(node, ast.ImportFrom) and node.module in {"pytest", "unittest"}
              and any(alias.name in SKIP_CALLS | SKIP_MARKS for alias in node.names)):
            found.append(node.lineno)
    return [f"{filename}:{line}" for line in sorted(set(found))]


def test_the_skip_scan_finds_every_form() -> None:
    source = """
import pytest
from pytest import skip
import unittest

pytestmark = pytest.mark.skipif(True, reason="x")

@pytest.mark.skip(reason="x")
def test_a():
    pytest.skip("x")

def test_b():
    yaml = pytest.importorskip("yaml")
    if yaml:
        skip("x")

@unittest.skipIf(True, "x")
class T(unittest.TestCase):
    def test_c(self):
        self.skipTest("x")

def test_fine(monkeypatch):
    with pytest.raises(pytest.skip.Exception):
        require_service("thing", "not here")
"""
    assert plain_skips(source, "f") == [f"f:{n}" for n in (3, 6, 8, 10, 13, 15, 17, 20)]


def test_tests_skip_only_through_require_service() -> None:
    """A missing service must fail in CI: a plain skip would pass silently there."""
    offenders: list[str] = []
    for path in sorted(TESTS.rglob("*.py")):
        if path in SKIP_ALLOWED:
            continue
        skips = plain_skips(path.read_text(), str(path.relative_to(TESTS.parent)))
        if len(skips) > NOT_YET_CONVERTED.get(path, 0):
            offenders += skips
    assert not offenders, (
        "skip only through tests.fixtures.services.require_service (or the fixtures that "
        f"call it), which fails under XCLOUD_REQUIRE_SERVICES=1: {offenders}")
