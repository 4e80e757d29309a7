"""Brokers on free ports with xcloud authentication and ACL, for a benchmark to measure.

Mosquitto is a child process with the password and ACL files exported by
``broker.mosquitto``; the embedded amqtt broker (``broker.embedded.EmbeddedBroker``)
runs in a spawned process of its own, so its event loop never shares a GIL with the
clients being measured. ``start_broker`` starts either by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from bench.identities import Identity, credentials, dict_authenticator
from bench.processes import LOCALHOST, SPAWN, die_with_parent, free_port, port_open, quiet_logging
from broker.credentials import hash_token
from broker.mosquitto import write_mosquitto_files


def mosquitto_binary() -> str:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which(os.environ.get("XCLOUD_MOSQUITTO", "mosquitto"), path=search) or (
        "/usr/sbin/mosquitto")


class Broker:
    """A running broker: ``url``, ``pid`` (for CPU accounting) and ``stop()``."""

    kind = "?"
    url = ""

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def start(self) -> Broker:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MosquittoBroker(Broker):
    """Mosquitto on a free port, authenticating our principals with the exported files.

    ``max_queued_messages 0`` (no per-client queue limit) unless told otherwise: with the
    default of 1000, Mosquitto silently drops QoS 0 messages for a subscriber that falls
    more than 1000 messages behind, and a throughput benchmark must not count drops as
    speed. ``set_tcp_nodelay true`` as recommended in docs for small messages.
    """

    kind = "mosquitto"

    def __init__(self, ids: dict[str, Identity], root: str, workdir: Path, *,
                 max_queued_messages: int | None = 0, extra: str = "") -> None:
        self.ids = ids
        self.root = root
        self.workdir = workdir / f"mosquitto-{uuid.uuid4().hex[:6]}"
        self.max_queued_messages = max_queued_messages
        self.extra = extra
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        passwd, acl = write_mosquitto_files(
            [(i.principal, hash_token(i.token)) for i in self.ids.values()], self.root,
            self.workdir)
        for attempt in range(3):
            self.port = free_port()
            lines = [
                f"listener {self.port} {LOCALHOST}",
                "allow_anonymous false",
                f"password_file {passwd}",
                f"acl_file {acl}",
                "persistence false",
                "set_tcp_nodelay true",
                f"log_dest file {self.workdir / 'mosquitto.log'}",
                "log_type error",
                "log_type warning",
                "connection_messages false",
            ]
            if self.max_queued_messages is not None:
                lines.append(f"max_queued_messages {self.max_queued_messages}")
            if os.geteuid() == 0:
                lines.append("user root")
            if self.extra:
                lines.append(self.extra)
            conf = self.workdir / "mosquitto.conf"
            conf.write_text("\n".join(lines) + "\n")
            self.proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(conf)], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=die_with_parent)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if port_open(LOCALHOST, self.port):
                    self.url = f"mqtt://{LOCALHOST}:{self.port}"
                    return self
                time.sleep(0.01)
            self.stop()
            if attempt == 2:
                log_file = self.workdir / "mosquitto.log"
                text = log_file.read_text() if log_file.exists() else ""
                raise RuntimeError(f"mosquitto did not start: {text[-2000:]}")
        raise AssertionError("unreachable")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _amqtt_main(conn: Any, root: str, creds: dict[str, tuple[str, str]]) -> None:
    """Child process: the embedded broker with a dict-backed authenticator."""
    die_with_parent()
    quiet_logging()
    from broker.embedded import BrokerSettings, EmbeddedBroker

    broker = EmbeddedBroker(BrokerSettings(host=LOCALHOST, port=0, root=root),
                            dict_authenticator(creds))
    broker.start_in_thread()
    conn.send(broker.port)
    with contextlib.suppress(EOFError, OSError):
        conn.recv()  # "stop", or EOF when the parent is gone
    broker.stop_in_thread()


class AmqttBroker(Broker):
    """xcloud's EmbeddedBroker (amqtt + our auth/ACL plugins) in a spawned process."""

    kind = "amqtt"

    def __init__(self, ids: dict[str, Identity], root: str, _workdir: Path | None = None
                 ) -> None:
        self.ids = ids
        self.root = root
        self.proc: Any = None
        self._conn: Any = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return int(self.proc.pid)

    def start(self, timeout: float = 30.0) -> AmqttBroker:
        parent, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=_amqtt_main,
                                  args=(child, self.root, credentials(self.ids)),
                                  name="bench-amqtt", daemon=True)
        self.proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(timeout):
            self.stop()
            raise RuntimeError("amqtt broker did not start")
        port = parent.recv()
        self.url = f"mqtt://{LOCALHOST}:{port}"
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        with contextlib.suppress(OSError):
            self._conn.close()


def start_broker(kind: str, ids: dict[str, Identity], root: str, workdir: Path,
                 **mosquitto_options: Any) -> Broker:
    if kind == "mosquitto":
        return MosquittoBroker(ids, root, workdir, **mosquitto_options).start()
    if kind == "amqtt":
        return AmqttBroker(ids, root, workdir).start()
    raise ValueError(f"unknown broker {kind!r}")
