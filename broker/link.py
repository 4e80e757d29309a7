"""The connection to the broker: its state, client ids, reconnect back-off, URLs.

Apart from ``broker/bus.py`` (which re-exports every name) because none of it needs the
bus itself: each piece is a pure function or a value, tested on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import random
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from broker.bus_types import BusError


@dataclass(frozen=True)
class LinkState:
    """Where our connection to the broker stands (``Bus.link_state``).

    ``epoch`` counts the connections that became ready (0: never connected); ``since``
    (wall clock) and ``ready_at`` (``time.monotonic()``, the clock of
    ``Incoming.received_at``) say when the current one did. Services that must not act on
    what they could not hear compare epochs: a changed epoch means we were cut off in
    between. A message received before ``ready_at`` came from an earlier connection, or
    was queued for our persistent session while we were away.
    """

    connected: bool
    epoch: int
    since: float
    ready_at: float = 0.0


CLIENT_ID_CONTEXT = b"xcloud mqtt client id v1\0"


def private_client_id(name: str, token: str) -> str:
    """``name`` plus a keyed hash of ``token``: stable across restarts, secret to others.

    A persistent session needs a stable client id, and on Mosquitto whoever connects with
    a client id takes that session over (kicking its owner and publishing its last will).
    A predictable id such as ``worker-<wid>`` would let any principal do that; this one
    can only be computed by whoever holds the token (docs/security.md, "Client ids").
    """
    if not token:
        return name  # anonymous: nothing secret to derive it from
    digest = hmac.new(token.encode(), CLIENT_ID_CONTEXT + name.encode(), hashlib.sha256)
    return f"{name}-{digest.hexdigest()[:32]}"


def backoff_delay(attempt: int, low: float, high: float, rng: random.Random) -> float:
    """Seconds before reconnect ``attempt`` (0-based): doubling from ``low`` up to
    ``high``, then scaled by a random factor in [0.5, 1] so that the components of a grid
    do not all reconnect at the same instant after a broker restart."""
    low = max(0.05, low)
    base = min(max(low, high), low * 2.0 ** min(attempt, 32))
    return base * rng.uniform(0.5, 1.0)


def parse_broker_url(url: str) -> tuple[str, str, int, bool]:
    """``mqtt://host:port``, ``mqtts://``, ``ws://``, ``wss://`` -> (transport, host, port, tls)."""
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    scheme = parsed.scheme.lower()
    defaults = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883, "ws": 80, "wss": 443}
    if scheme not in defaults or not parsed.hostname:
        raise BusError(f"bad broker URL {url!r}: expected mqtt://host:port (or mqtts/ws/wss)")
    transport = "websockets" if scheme in ("ws", "wss") else "tcp"
    return transport, parsed.hostname, parsed.port or defaults[scheme], scheme in (
        "mqtts", "ssl", "wss")


def set_nodelay(client: mqtt.Client) -> None:
    """Disable Nagle: small QoS 1 messages otherwise wait ~40 ms on delayed ACKs."""
    sock = client.socket()
    raw: Any = getattr(sock, "_socket", sock)  # websockets wrap the real socket
    with contextlib.suppress(OSError, AttributeError):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
