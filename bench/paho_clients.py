"""Raw paho MQTT clients (MQTT 3.1.1, TCP_NODELAY) connected as a bench identity: the
floor that the xcloud bus is measured against, and the publishers of simulated workers.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.identities import Identity
from bench.processes import LOCALHOST


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or LOCALHOST, parts.port or 1883


def set_nodelay(client: mqtt.Client) -> None:
    sock = client.socket()
    raw: Any = getattr(sock, "_socket", sock)
    with contextlib.suppress(OSError, AttributeError):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def paho_connect(url: str, ident: Identity, client_id: str | None = None, *,
                 threaded: bool = True, timeout: float = 10.0,
                 on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None] | None = None,
                 subscribe: Sequence[tuple[str, int]] = ()) -> mqtt.Client:
    """A connected raw paho client (MQTT 3.1.1, TCP_NODELAY), subscriptions acknowledged.

    ``threaded``: paho's network loop runs in its own thread (``loop_start``); otherwise
    the caller drives ``client.loop()`` itself (lowest latency, no thread hand-off).
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or
                         f"{ident.id}-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311)
    client.username_pw_set(ident.id, ident.token)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    connected = threading.Event()
    subscribed = threading.Event()
    refused: list[str] = []

    def on_connect(c: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
            return
        set_nodelay(c)
        connected.set()

    def on_subscribe(_c: mqtt.Client, _userdata: Any, _mid: int, codes: Any, _props: Any) -> None:
        bad = [str(rc) for rc in codes if rc.is_failure]
        if bad:
            refused.append(f"subscription refused: {bad}")
        subscribed.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    if on_message is not None:
        client.on_message = on_message
    host, port = host_port(url)
    client.connect(host, port, keepalive=60)
    deadline = time.monotonic() + timeout

    def pump(event: threading.Event) -> None:
        while not event.is_set():
            if refused:
                raise RuntimeError(f"{ident.id}: {refused[0]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ident.id}: no answer from broker {url}")
            if threaded:
                event.wait(0.01)
            else:
                client.loop(0.01)

    if threaded:
        client.loop_start()
    pump(connected)
    if subscribe:
        client.subscribe(list(subscribe))
        pump(subscribed)
        if refused:
            raise RuntimeError(f"{ident.id}: {refused[0]}")
    return client


def paho_close(client: mqtt.Client, threaded: bool = True) -> None:
    with contextlib.suppress(Exception):
        client.disconnect()
    if threaded:
        with contextlib.suppress(Exception):
            client.loop_stop()
