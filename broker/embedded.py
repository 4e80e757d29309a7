"""The embedded MQTT broker: amqtt with xcloud's authentication and topic ACL.

The coordinator (or ``xcloud up``) runs it in-process. Identity is the MQTT username,
the token is the password; the caller passes an ``Authenticator`` (the broker knows
nothing about databases) and every publish, subscribe and delivery is checked against
``broker.acl.Acl``.

amqtt 0.12 loads plugins from the ``plugins`` dict of its config, keyed by dotted class
path, and hydrates each plugin's ``Config`` dataclass from the value with dacite. A field
typed ``Any`` passes an object through untouched, so each plugin instance receives this
broker's ``_Runtime`` (ACL, authenticator, cache) directly: no module-level registry.

Where amqtt 0.12.1 falls short for a security boundary, ``_XcloudAmqttBroker`` overrides
a few of its internal methods; its docstring lists each problem and fix, and
tests/test_embedded_broker.py pins every one. They rely on amqtt 0.12.1 internals: re-run
those tests when upgrading amqtt.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hashlib
import importlib.metadata
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import websockets
from amqtt.adapters import (
    ReaderAdapter,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WebSocketsReader,
    WebSocketsWriter,
    WriterAdapter,
)
from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.errors import BrokerError as AmqttBrokerError
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id
from websockets.asyncio.server import ServerConnection

from broker.acl import Acl, Principal, Role
from broker.errors import BrokerError, PortInUseError
from schemas.topics import DEFAULT_ROOT, valid_principal_id

log = logging.getLogger(__name__)

Authenticator = Callable[[str, str], Principal | None]
"""Given MQTT username and password (token), the principal, or None to refuse."""

PRINCIPAL_KEY = "xcloud.principal"
"""Key of the authenticated ``Principal`` in ``amqtt.session.Session.attributes``."""

_PREAUTH_KEY = "xcloud.preauthenticated"
_CLOSE_DRAIN_TIMEOUT_S = 5.0
_MAX_MQTT_STRING = 65535
_NOISY_LOGGERS = ("amqtt", "transitions", "websockets")


@dataclass
class BrokerSettings:
    """How the embedded broker listens and what it accepts.

    ``port``/``ws_port`` 0 picks a free port (read it back from ``EmbeddedBroker.port``).
    ``max_payload`` caps a PUBLISH payload; larger packets drop the connection before
    the payload is read. ``session_expiry_s`` forgets disconnected persistent sessions
    (and the messages queued for them), bounding memory when client ids churn.
    ``keepalive_factor`` is how many keep-alive periods of silence disconnect a client
    (MQTT says 1.5); its last will is then published. ``connect_timeout_s`` is how long
    a new socket may take to send its CONNECT.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    ws_port: int | None = None
    root: str = DEFAULT_ROOT
    allow_anonymous: bool = False
    max_payload: int = 4 * 1024 * 1024
    session_expiry_s: int | None = 900
    auth_cache_ttl_s: float = 5.0
    auth_workers: int = 4
    keepalive_factor: float = 1.5
    connect_timeout_s: float = 10.0
    max_connections: int = 0  # 0 = unlimited
    quiet_amqtt_logs: bool = True


class PayloadTooLargeError(BrokerError):
    """A client sent a packet larger than ``BrokerSettings.max_payload`` allows."""


# -- authentication ------------------------------------------------------------------


class _AuthCache:
    """Successful logins for a short TTL, keyed by (user, sha256(token)).

    Connect storms (a restarted grid reconnecting at once) then cost one lookup per
    principal, not one per connection. Failures are never cached, so a newly issued
    token works at once; a revoked token keeps working for at most ``ttl`` seconds.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[tuple[str, bytes], tuple[float, Principal]] = {}

    @staticmethod
    def key(user: str, token: str) -> tuple[str, bytes]:
        return user, hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

    def get(self, key: tuple[str, bytes]) -> Principal | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, principal = entry
        if expires < time.monotonic():
            self._entries.pop(key, None)
            return None
        return principal

    def put(self, key: tuple[str, bytes], principal: Principal) -> None:
        if self.ttl <= 0:
            return
        now = time.monotonic()
        if len(self._entries) >= self.max_entries:
            self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
        self._entries[key] = (now + self.ttl, principal)

    def clear(self) -> None:
        self._entries.clear()


class _DenialLog:
    """Log ACL denials at WARNING once per (principal, action) per minute, else DEBUG.

    A misbehaving client retrying a forbidden publish must not flood the log.
    """

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}

    def denied(self, who: str, action: str, topic: str) -> None:
        now = time.monotonic()
        key = (who, action)
        if now - self._last.get(key, -math.inf) >= self.interval:
            if len(self._last) > 10_000:
                self._last.clear()
            self._last[key] = now
            log.warning(
                "ACL: %s may not %s %r (further denials logged at DEBUG)", who, action, topic
            )
        else:
            log.debug("ACL: %s may not %s %r", who, action, topic)


@dataclass
class _Runtime:
    """Everything the plugins of one broker need, handed to them through plugin Config."""

    acl: Acl
    authenticator: Authenticator
    allow_anonymous: bool
    executor: concurrent.futures.ThreadPoolExecutor
    cache: _AuthCache
    denials: _DenialLog = field(default_factory=_DenialLog)

    async def resolve(self, session: Session) -> Principal | None:
        """The principal for the session's credentials, or None to refuse the CONNECT."""
        user = session.username
        token = session.password
        if user is None:
            if self.allow_anonymous and token is None:
                return Principal("anonymous", Role.CLIENT)
            return None
        if not valid_principal_id(user):
            return None
        if token is None:
            # Anonymous mode names the client by its username; without it, no token no entry.
            return Principal(user, Role.CLIENT) if self.allow_anonymous else None
        key = self.cache.key(user, token)
        principal = self.cache.get(key)
        if principal is None:
            loop = asyncio.get_running_loop()
            try:
                # The authenticator may hit a database: keep the broker's loop free.
                principal = await loop.run_in_executor(
                    self.executor, self.authenticator, user, token
                )
            except Exception:
                log.exception("authenticator failed for user %r; refusing the connection", user)
                return None
            if principal is not None and not isinstance(principal, Principal):
                log.error(
                    "authenticator returned %r for %r, not a Principal; refusing", principal, user
                )
                return None
            if principal is not None and principal.id != user:
                log.error(
                    "authenticator mapped user %r to principal %r; refusing", user, principal.id
                )
                return None
            if principal is not None:
                self.cache.put(key, principal)
        # A presented but wrong token is refused even in anonymous mode: silently
        # downgrading a misconfigured worker to an anonymous client would hide the error.
        return principal


def principal_of(session: Session | None) -> Principal | None:
    """The principal the auth plugin attached to an amqtt session, if any."""
    if session is None:
        return None
    p = session.attributes.get(PRINCIPAL_KEY)
    return p if isinstance(p, Principal) else None


class XcloudAuthPlugin(BaseAuthPlugin):
    """amqtt auth plugin: credentials -> ``Principal`` via the caller's authenticator.

    Also refuses a CONNECT whose last-will topic the principal may not publish to:
    amqtt publishes wills without any topic check, so this is the only place to stop a
    client from forging, say, another worker's retained ``offline`` status.
    """

    @dataclass
    class Config:
        runtime: Any = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        runtime = getattr(self.config, "runtime", None)
        if not isinstance(runtime, _Runtime):
            raise BrokerError("XcloudAuthPlugin needs its broker runtime in the plugin config")
        self.runtime: _Runtime = runtime

    async def authenticate(self, *, session: Session) -> bool:
        """Decide a CONNECT; on success remember the principal on the session."""
        session.attributes.pop(PRINCIPAL_KEY, None)
        principal = await self.runtime.resolve(session)
        if principal is None:
            log.info("refused CONNECT of client %r as user %r", session.client_id, session.username)
            return False
        if session.will_flag and not self.runtime.acl.can_publish(
            principal, session.will_topic or ""
        ):
            log.warning(
                "refused CONNECT of %s: last-will topic %r is not one it may publish to",
                principal.id,
                session.will_topic,
            )
            return False
        if session.will_flag and session.will_retain:
            if not self.runtime.acl.can_retain(principal, session.will_topic or ""):
                log.info(
                    "%s: last will on %r will not be retained", principal.id, session.will_topic
                )
                session.will_retain = False
        session.attributes[PRINCIPAL_KEY] = principal
        return True


class XcloudTopicPlugin(BaseTopicPlugin):
    """amqtt topic plugin: enforces ``Acl`` on publish, subscribe and delivery."""

    @dataclass
    class Config:
        runtime: Any = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        runtime = getattr(self.config, "runtime", None)
        if not isinstance(runtime, _Runtime):
            raise BrokerError("XcloudTopicPlugin needs its broker runtime in the plugin config")
        self.runtime: _Runtime = runtime

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        return check_topic(self.runtime, session, topic, action)


def check_topic(
    runtime: _Runtime, session: Session | None, topic: str | None, action: Action | None
) -> bool:
    """The ACL decision for one amqtt topic check (False for anything unexpected)."""
    principal = principal_of(session)
    if principal is None or topic is None:
        return False
    acl = runtime.acl
    if action == Action.PUBLISH:
        ok = acl.can_publish(principal, topic)
    elif action == Action.SUBSCRIBE:
        ok = acl.can_subscribe(principal, topic)
    elif action == Action.RECEIVE:
        ok = acl.can_receive(principal, topic)
        if not ok:
            log.debug("ACL: not delivering %r to %s", topic, principal.id)
        return ok
    else:
        return False
    if not ok:
        runtime.denials.denied(principal.id, str(action), topic)
    return ok


# -- the amqtt broker, hardened ---------------------------------------------------------


class _GuardedReader(ReaderAdapter):
    """Reader adapter that refuses oversized reads and can be expired.

    amqtt reads a PUBLISH payload with one ``read(n)`` of the announced length, so
    checking ``n`` stops an oversized packet before any of it is buffered. ``expire()``
    makes the next read return EOF: amqtt's broker ignores keep-alive timeouts
    (``handle_read_timeout`` is a no-op), and EOF is its path to "client gone, publish
    the will".
    """

    def __init__(self, inner: ReaderAdapter, limit: int, peer: str) -> None:
        self._inner = inner
        self._limit = limit
        self._peer = peer
        self._expired = False

    async def read(self, n: int = -1) -> bytes:
        if self._expired:
            return b""
        if n > self._limit:
            log.warning(
                "dropping connection from %s: packet of %d bytes exceeds the limit", self._peer, n
            )
            raise PayloadTooLargeError(f"packet of {n} bytes exceeds the limit of {self._limit}")
        return await self._inner.read(n)

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    def expire(self) -> None:
        self._expired = True


def _read_limit(max_payload: int) -> int:
    # Besides the payload, single reads are MQTT strings (<= 65535 bytes).
    return max(max_payload, _MAX_MQTT_STRING + 2)


class _ClosingStreamWriter(StreamWriterAdapter):
    """StreamWriterAdapter whose ``close()`` always closes the socket.

    amqtt's version drains first and, when the peer has already reset the connection,
    the drain raises before ``close()`` is reached: the socket then stays open until the
    garbage collector finds it (one leaked fd per client that vanished). A client that
    stops reading could also block the drain forever.
    """

    is_closed: bool

    async def close(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        try:
            await asyncio.wait_for(self._writer.drain(), _CLOSE_DRAIN_TIMEOUT_S)
            if self._writer.can_write_eof():
                self._writer.write_eof()
        except (TimeoutError, OSError, RuntimeError):
            pass
        finally:
            self._writer.close()
        with suppress(TimeoutError, OSError, RuntimeError):
            await asyncio.wait_for(self._writer.wait_closed(), _CLOSE_DRAIN_TIMEOUT_S)


class _XcloudAmqttBroker(Broker):
    """amqtt's Broker with the fixes a multi-tenant security boundary needs.

    Each override below works around a behaviour of amqtt 0.12.1 found while testing
    (tests/test_embedded_broker.py pins every one):

    * payload limit: amqtt reads any packet up to MQTT's 256 MiB; the reader refuses
      reads above ``max_payload`` before buffering (and WebSockets get a frame limit);
    * keep-alive: amqtt never disconnects a silent client, so a vanished worker's will
      was never published; the reader is expired after ``keepalive_factor`` periods;
    * authentication first: amqtt deletes or takes over the session named by a
      CONNECT's client id *before* checking credentials, so anyone could wipe or kick
      any client by id; here a CONNECT is authenticated before it can touch a session,
      and may not take over a session that belongs to another principal;
    * retained messages: at every CONNECT amqtt replays retained messages matching
      *every* subscription of *every* client to the newcomer; here only the client's
      own subscriptions are replayed, and each message passes the ACL;
    * invalid PUBLISH topics (wildcards, ``$``): amqtt stops serving the connection
      but leaves it open and unread, so its queue grows forever and its will is never
      sent; here the connection is closed properly;
    * sockets: a CONNECT must arrive within ``connect_timeout_s``, and every socket is
      closed even when the peer vanished first (amqtt leaked those until GC);
    * retained messages are stored only on state topics (``Acl.can_retain``): a
      retained request in an inbox would be replayed at every subscribe;
    * messages queued for an offline persistent session are delivered with RETAIN
      cleared (amqtt sets it, so inboxes dropped them);
    * topic checks call the ACL directly rather than through the plugin manager,
      which spawns a task per check on the per-delivery hot path (~10x slower).
    """

    def __init__(self, config: BrokerConfig, runtime: _Runtime, settings: BrokerSettings) -> None:
        super().__init__(config)
        self._xc_runtime = runtime
        self._xc_settings = settings
        self._xc_read_limit = _read_limit(settings.max_payload)

    # -- payload limit: wrap every connection's reader before amqtt parses anything ---
    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        peer = str(writer.get_extra_info("peername"))
        guarded = _GuardedReader(StreamReaderAdapter(reader), self._xc_read_limit, peer)
        await self._client_connected(listener_name, guarded, _ClosingStreamWriter(writer))

    async def ws_connected(self, websocket: ServerConnection, listener_name: str) -> None:
        peer = str(websocket.remote_address)
        guarded = _GuardedReader(WebSocketsReader(websocket), self._xc_read_limit, peer)
        await self._client_connected(listener_name, guarded, WebSocketsWriter(websocket))

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: Any,
    ) -> Any:
        if listener_type == ListenerType.WS:
            # amqtt keeps websockets' default 1 MiB message limit, below our payload limit.
            return await websockets.serve(
                partial(self.ws_connected, listener_name=listener_name),
                address,
                port,
                ssl=ssl_context,
                subprotocols=[websockets.Subprotocol("mqtt")],
                max_size=self._xc_read_limit + 1024,
            )
        return await super()._create_server_instance(
            listener_name, listener_type, address, port, ssl_context
        )

    # -- CONNECT: authenticate before any session is touched --------------------------
    async def _initialize_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        remote_address: str,
        remote_port: int,
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            # amqtt waits for the CONNECT forever; a socket that never sends one would
            # hold its file descriptor (and a listener slot) for good.
            handler, incoming = await asyncio.wait_for(
                BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager),
                self._xc_settings.connect_timeout_s,
            )
        except TimeoutError as exc:
            await writer.close()
            raise AMQTTError(f"no CONNECT within {self._xc_settings.connect_timeout_s} s") from exc
        except (AMQTTError, NoDataError) as exc:
            await writer.close()  # amqtt leaves the socket open here
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc

        client_id = incoming.client_id
        refusal: int | None = None
        authenticated = await super()._authenticate(incoming, ListenerConfig())
        existing = self._sessions.get(client_id) if client_id else None  # after the await
        if not authenticated:
            refusal = NOT_AUTHORIZED
        elif existing is not None:
            owner = principal_of(existing[0])
            newcomer = principal_of(incoming)
            if owner is not None and newcomer is not None and owner.id != newcomer.id:
                log.warning(
                    "refused CONNECT of %s with client id %r: that session belongs to %s",
                    newcomer.id,
                    client_id,
                    owner.id,
                )
                refusal = IDENTIFIER_REJECTED
        if refusal is not None:
            await ConnackPacket.build(0, refusal).to_stream(writer)
            await writer.close()
            raise MQTTError(f"CONNECT refused (code {refusal}) for client id {client_id!r}")
        incoming.attributes[_PREAUTH_KEY] = True

        # From here on as upstream, except that a clean-session CONNECT disconnects the
        # live connection it replaces [MQTT-3.1.4-2] instead of leaving it orphaned.
        client_session = incoming
        if incoming.clean_session:
            if client_id:
                if existing is not None and existing[0].transitions.is_connected():
                    log.info("client %r reconnected; closing its previous connection", client_id)
                    await existing[1].handle_connection_closed()
                    await existing[1].stop()
                await self._delete_session(client_id)
            else:
                incoming.client_id = gen_client_id()
            incoming.parent = 0
        elif existing is not None:
            old = existing[0]
            old.will_flag = incoming.will_flag
            old.will_message = incoming.will_message
            old.will_topic = incoming.will_topic
            old.will_qos = incoming.will_qos
            old.will_retain = incoming.will_retain
            old.keep_alive = incoming.keep_alive
            old.username = incoming.username
            old.password = incoming.password
            old.attributes.update(incoming.attributes)
            client_session = old
            client_session.parent = 1
        else:
            incoming.parent = 0

        # Keep-alive: amqtt waits keep_alive seconds for a packet, then does nothing.
        # Allow keepalive_factor periods, then expire the reader (-> EOF -> will).
        if client_session.keep_alive > 0:
            client_session.keep_alive = math.ceil(
                client_session.keep_alive * self._xc_settings.keepalive_factor
            )
        if isinstance(reader, _GuardedReader):
            handler.handle_read_timeout = reader.expire
        return handler, client_session

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        # Already decided in _initialize_client_session; do not ask the authenticator twice.
        if session.attributes.pop(_PREAUTH_KEY, False):
            return principal_of(session) is not None
        return await super()._authenticate(session, listener)

    # -- topic checks: the same decision as XcloudTopicPlugin, minus a task per call ---
    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        # amqtt dispatches every check (publish, subscribe, and each delivery to each
        # subscriber) as a new task per plugin: ~30 us against ~3 us for the direct call.
        return check_topic(self._xc_runtime, session, topic, action)

    # -- queued messages: delivered as what they are, not as retained ------------------
    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Deliver what was queued for an offline persistent session.

        amqtt (despite the name: these are messages queued while the client was away)
        sends them with the RETAIN flag set, and receivers rightly ignore retained
        messages in inboxes, so e.g. a reservation.close queued for a restarted worker
        was lost. Here they go out as ordinary publications.
        """
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        while not session.retained_messages.empty():
            queued = await session.retained_messages.get()
            tasks.append(asyncio.ensure_future(
                handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)))
        if tasks:
            await asyncio.wait(tasks)

    # -- retained messages: only the client's own subscriptions, only what it may read -
    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        subscribers = self._subscriptions.get(topic_filter, ())
        if not any(s.client_id == session.client_id for s, _ in subscribers):
            return  # amqtt asks this at CONNECT for every filter of every client
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not check_topic(self._xc_runtime, session, topic, Action.RECEIVE):
                continue
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(
                        retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                    )
                )
            )
        if tasks:
            await asyncio.wait(tasks)

    # -- invalid topics: close the connection instead of abandoning it -----------------
    async def _handle_message_delivery(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        message = wait_deliver.result()
        topic = getattr(message, "topic", None)
        if message is not None and (
            not topic or "+" in topic or "#" in topic or topic.startswith("$")
        ):
            log.warning(
                "closing connection of %r: PUBLISH to invalid topic %r",
                client_session.client_id,
                topic,
            )
            if handler.writer is not None:
                await handler.writer.close()  # the reader sees EOF; normal disconnect path
            return True
        packet = getattr(message, "publish_packet", None)
        if packet is not None and packet.retain_flag and topic:
            principal = principal_of(client_session)
            if principal is None or not self._xc_runtime.acl.can_retain(principal, topic):
                log.debug("%r: not retaining message on %r", client_session.client_id, topic)
                packet.retain_flag = False  # delivered if allowed, but never stored
        return await super()._handle_message_delivery(client_session, handler, wait_deliver)


# -- the public broker ------------------------------------------------------------------


_TESTED_AMQTT = "0.12."


def _check_amqtt_version() -> None:
    """Warn when amqtt is not the series whose internals _XcloudAmqttBroker overrides."""
    try:
        version = importlib.metadata.version("amqtt")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored copy
        return
    if not version.startswith(_TESTED_AMQTT):
        log.warning(
            "amqtt %s is installed but the embedded broker's fixes were written for %sx; "
            "run tests/test_embedded_broker.py before trusting it",
            version,
            _TESTED_AMQTT,
        )


def _quiet_noisy_loggers() -> None:
    """amqtt (and the libraries under it) log per connection at INFO; default to WARNING."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def _port_in_use(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.EADDRINUSE:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def check_port_free(host: str, port: int) -> None:
    """Raise PortInUseError when ``host:port`` cannot be bound (like the broker will)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # Same option as asyncio's server, so a port in TIME_WAIT is not reported busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise PortInUseError(host, port) from err
            raise BrokerError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err


class EmbeddedBroker:
    """An amqtt broker with xcloud auth and ACL, in the caller's loop or its own thread.

    Inside a running loop use ``await start()`` / ``await stop()``; from synchronous code
    use ``start_in_thread()`` / ``stop_in_thread()``, which host a private event loop in
    a daemon thread.
    """

    def __init__(self, settings: BrokerSettings, authenticator: Authenticator) -> None:
        self.settings = settings
        self.acl = Acl(settings.root)
        self._authenticator = authenticator
        self._broker: _XcloudAmqttBroker | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._runtime: _Runtime | None = None
        self._port: int | None = None
        self._ws_port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    # -- addresses --------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The TCP port actually listened on (differs from settings when that was 0)."""
        return self._port if self._port is not None else self.settings.port

    @property
    def ws_port(self) -> int | None:
        return self._ws_port if self._ws_port is not None else self.settings.ws_port

    @property
    def url(self) -> str:
        return f"mqtt://{self.settings.host}:{self.port}"

    @property
    def ws_url(self) -> str | None:
        return None if self.ws_port is None else f"ws://{self.settings.host}:{self.ws_port}"

    @property
    def running(self) -> bool:
        return self._broker is not None

    def invalidate_credentials(self) -> None:
        """Forget cached logins (call after revoking a token to make it fail at once)."""
        if self._runtime is not None:
            self._runtime.cache.clear()

    # -- in a running loop -------------------------------------------------------------
    def _config(self, runtime: _Runtime) -> BrokerConfig:
        s = self.settings
        listeners = {
            "default": ListenerConfig(
                type=ListenerType.TCP, bind=f"{s.host}:{s.port}", max_connections=s.max_connections
            )
        }
        if s.ws_port is not None:
            listeners["ws"] = ListenerConfig(
                type=ListenerType.WS,
                bind=f"{s.host}:{s.ws_port}",
                max_connections=s.max_connections,
            )
        # Only our two plugins: no event/packet loggers (a task per packet), no $SYS.
        plugins = {
            f"{__name__}.XcloudAuthPlugin": {"runtime": runtime},
            f"{__name__}.XcloudTopicPlugin": {"runtime": runtime},
        }
        return BrokerConfig(
            listeners=listeners,
            plugins=plugins,
            session_expiry_interval=s.session_expiry_s,
            timeout_disconnect_delay=0,
        )

    async def start(self) -> None:
        """Start listening; raises PortInUseError or BrokerError when it cannot."""
        if self._broker is not None:
            raise BrokerError("embedded broker already started")
        s = self.settings
        if s.quiet_amqtt_logs:
            _quiet_noisy_loggers()
        _check_amqtt_version()
        check_port_free(s.host, s.port)
        if s.ws_port is not None:
            check_port_free(s.host, s.ws_port)
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, s.auth_workers), thread_name_prefix="xcloud-broker-auth"
        )
        runtime = _Runtime(
            acl=self.acl,
            authenticator=self._authenticator,
            allow_anonymous=s.allow_anonymous,
            executor=executor,
            cache=_AuthCache(s.auth_cache_ttl_s),
        )
        broker = _XcloudAmqttBroker(self._config(runtime), runtime, s)
        try:
            await broker.start()
        except AmqttBrokerError as err:
            await self._abort_start(broker, executor)
            failed = self._failed_listener(err)
            if _port_in_use(err):
                raise PortInUseError(s.host, failed) from err
            raise BrokerError(f"embedded broker failed to start: {err}") from err
        except BaseException:
            await self._abort_start(broker, executor)
            raise
        self._broker, self._executor, self._runtime = broker, executor, runtime
        self._port = self._bound_port(broker, "default")
        self._ws_port = self._bound_port(broker, "ws") if s.ws_port is not None else None
        log.info(
            "embedded MQTT broker listening on %s%s",
            self.url,
            f" and {self.ws_url}" if self.ws_url else "",
        )

    def _failed_listener(self, err: BaseException) -> int:
        text = str(err)
        ws = self.settings.ws_port
        if ws is not None and f":{ws}" in text:
            return ws
        return self.settings.port

    @staticmethod
    async def _abort_start(broker: Broker, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        # amqtt leaves already-opened listeners open when a later one fails.
        for server in list(broker._servers.values()):
            try:
                await server.close_instance()
            except Exception:  # pragma: no cover - best effort cleanup
                log.debug("closing listener after failed start", exc_info=True)
        executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _bound_port(broker: Broker, listener: str) -> int | None:
        server = broker._servers.get(listener)
        if server is None or server.instance is None:
            return None
        for sock in getattr(server.instance, "sockets", None) or ():
            return int(sock.getsockname()[1])
        return None

    async def stop(self) -> None:
        """Disconnect everyone and close the listeners (no-op when not started)."""
        broker, self._broker = self._broker, None
        if broker is None:
            return
        try:
            await broker.shutdown()
        except Exception:
            log.exception("error while shutting down the embedded broker")
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
            self._runtime = None

    # -- in a thread ---------------------------------------------------------------------
    def start_in_thread(self, timeout: float = 10.0) -> None:
        """Run the broker on a private event loop in a daemon thread; return once listening.

        Raises PortInUseError / BrokerError like ``start()``; on a start timeout the
        half-started broker is cancelled and its thread joined.
        """
        if self._thread is not None:
            raise BrokerError("embedded broker already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()
        task: asyncio.Task[None] = loop.create_task(self._serve(ready, failure))

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(task)
            except asyncio.CancelledError:
                pass
            except BaseException as err:  # pragma: no cover - _serve reports its errors
                failure.append(err)
            finally:
                try:
                    loop.run_until_complete(loop.shutdown_asyncgens())
                    loop.run_until_complete(loop.shutdown_default_executor())
                finally:
                    loop.close()
                    ready.set()

        thread = threading.Thread(target=run, name="xcloud-broker", daemon=True)
        self._thread, self._loop, self._task = thread, loop, task
        thread.start()
        if not ready.wait(timeout):
            self.stop_in_thread(timeout)
            raise BrokerError(f"embedded broker did not start within {timeout} s")
        if failure:
            self.stop_in_thread(timeout)
            raise failure[0]

    async def _serve(self, ready: threading.Event, failure: list[BaseException]) -> None:
        try:
            await self.start()
        except BaseException as err:  # reported to the starting thread
            failure.append(err)
            ready.set()
            return
        ready.set()
        try:
            await asyncio.Event().wait()  # until stop_in_thread cancels us
        finally:
            await self.stop()

    def stop_in_thread(self, timeout: float = 10.0) -> None:
        """Stop a broker started with ``start_in_thread`` and join its thread."""
        thread, loop, task = self._thread, self._loop, self._task
        if thread is None or loop is None or task is None:
            return
        try:
            loop.call_soon_threadsafe(task.cancel)
        except RuntimeError:  # loop already closed: the thread is ending by itself
            pass
        thread.join(timeout)
        if thread.is_alive():
            raise BrokerError(f"embedded broker thread did not stop within {timeout} s")
        self._thread = self._loop = self._task = None

    def __enter__(self) -> EmbeddedBroker:
        self.start_in_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_in_thread()
