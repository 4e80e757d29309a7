"""amqtt 0.12.1, hardened: the fixes a multi-tenant MQTT security boundary needs.

``HardenedAmqttBroker`` overrides a few of amqtt's internal methods, and wraps every
connection in ``GuardedReader``/``ClosingStreamWriter``; the class docstring lists each
problem and fix, and tests/test_embedded_broker.py pins every one. They rely on amqtt
0.12.1 internals: re-run those tests when upgrading amqtt (``check_amqtt_version`` warns).

It also gives the embedded broker what amqtt's public API lacks: the live sessions, a
re-authentication of one of them that cuts it at once when it no longer passes, and
*internal topics*, consumed by the broker itself instead of being routed.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import math
import weakref
from collections.abc import Callable, Mapping
from contextlib import suppress
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
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id
from websockets.asyncio.server import ServerConnection

from broker.acl import Principal
from broker.amqtt_plugins import AUTH_GENERATION_KEY, PluginRuntime, check_topic, principal_of
from broker.errors import BrokerError

log = logging.getLogger(__name__)

InternalConsumer = Callable[[Principal, bytes], None]
"""Takes a PUBLISH to an internal topic: the authenticated sender and the payload."""

_PREAUTH_KEY = "xcloud.preauthenticated"
_CLOSE_DRAIN_TIMEOUT_S = 5.0
_MAX_MQTT_STRING = 65535


class PayloadTooLargeError(BrokerError):
    """A client sent a packet larger than ``BrokerSettings.max_payload`` allows."""


class GuardedReader(ReaderAdapter):
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
        data: bytes = await self._inner.read(n)
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    def expire(self) -> None:
        self._expired = True


def read_limit(max_payload: int) -> int:
    # Besides the payload, single reads are MQTT strings (<= 65535 bytes).
    return max(max_payload, _MAX_MQTT_STRING + 2)


class ClosingStreamWriter(StreamWriterAdapter):
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

    def abort(self) -> None:
        """Drop the connection now, unsent data and all (a cut must not wait on a drain)."""
        self.is_closed = True
        self._writer.transport.abort()


def abort_connection(writer: WriterAdapter | None) -> None:
    """Drop a connection at once, whichever listener it came in on."""
    if isinstance(writer, ClosingStreamWriter):
        writer.abort()
    elif isinstance(writer, WebSocketsWriter):
        with suppress(Exception):  # already gone is fine
            writer._protocol.transport.abort()


class HardenedAmqttBroker(Broker):
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

    And what amqtt lacks: ``live_sessions``/``reauthenticate`` re-check a connected
    session's credentials and cut it at once when they no longer pass (revocation); a
    session whose login raced with such a recheck is checked again once it is live.
    PUBLISHes to an ``internal`` topic go, after the publish ACL, to that topic's
    consumer instead of to subscribers.
    """

    def __init__(
        self,
        config: BrokerConfig,
        runtime: PluginRuntime,
        *,
        max_payload: int,
        keepalive_factor: float,
        connect_timeout_s: float,
        internal: Mapping[str, InternalConsumer] | None = None,
    ) -> None:
        super().__init__(config)
        self._xc_runtime = runtime
        self._xc_read_limit = read_limit(max_payload)
        self._xc_keepalive_factor = keepalive_factor
        self._xc_connect_timeout_s = connect_timeout_s
        self._xc_internal = dict(internal or {})
        # Connections already cut whose session amqtt has not marked disconnected yet.
        self._xc_cut: weakref.WeakSet[BrokerProtocolHandler] = weakref.WeakSet()

    # -- live sessions: re-authentication and cutting ---------------------------------
    def live_sessions(self) -> list[tuple[Session, BrokerProtocolHandler]]:
        """The connected sessions with their handlers (a snapshot)."""
        return [
            (session, handler)
            for session, handler in list(self._sessions.values())
            if session.transitions.is_connected() and handler not in self._xc_cut
        ]

    def _is_live(self, session: Session, handler: BrokerProtocolHandler) -> bool:
        entry = self._sessions.get(session.client_id or "")
        return (
            entry is not None
            and entry[0] is session
            and entry[1] is handler
            and session.transitions.is_connected()
            and handler not in self._xc_cut
        )

    async def reauthenticate(self, session: Session, handler: BrokerProtocolHandler) -> bool:
        """Check a live session's credentials again, as a new CONNECT would be checked.

        When they no longer yield the same principal (revoked, rotated, role changed),
        the connection is cut at once: its socket is aborted and amqtt's "connection
        lost" path runs (the last will is published, a persistent session stays for its
        expiry). True when it was cut, here or by a concurrent check.
        """
        before = principal_of(session)
        if before is None or not self._is_live(session, handler):
            return False
        now = await self._xc_runtime.resolve(session)
        if now == before:
            return False
        if handler in self._xc_cut:
            return True  # a concurrent check (another recheck, the go-live one) cut it
        if not self._is_live(session, handler):
            return False  # gone (or replaced) by itself while we asked
        log.warning(
            "cutting the connection of %s (client %r): its credentials no longer pass",
            before.id,
            session.client_id,
        )
        self._xc_cut.add(handler)
        abort_connection(handler.writer)
        await handler.handle_connection_closed()
        return True

    # -- payload limit: wrap every connection's reader before amqtt parses anything ---
    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        peer = str(writer.get_extra_info("peername"))
        guarded = GuardedReader(StreamReaderAdapter(reader), self._xc_read_limit, peer)
        await self._client_connected(listener_name, guarded, ClosingStreamWriter(writer))

    async def ws_connected(self, websocket: ServerConnection, listener_name: str) -> None:
        peer = str(websocket.remote_address)
        guarded = GuardedReader(WebSocketsReader(websocket), self._xc_read_limit, peer)
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
        remote_address: str,  # noqa: ARG002 - amqtt's signature
        remote_port: int,  # noqa: ARG002
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            # amqtt waits for the CONNECT forever; a socket that never sends one would
            # hold its file descriptor (and a listener slot) for good.
            handler, incoming = await asyncio.wait_for(
                BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager),
                self._xc_connect_timeout_s,
            )
        except TimeoutError as exc:
            await writer.close()
            raise AMQTTError(f"no CONNECT within {self._xc_connect_timeout_s} s") from exc
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
                client_session.keep_alive * self._xc_keepalive_factor
            )
        if isinstance(reader, GuardedReader):
            handler.handle_read_timeout = reader.expire
        return handler, client_session

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        # Already decided in _initialize_client_session; do not ask the authenticator twice.
        if session.attributes.pop(_PREAUTH_KEY, False):
            return principal_of(session) is not None
        allowed: bool = await super()._authenticate(session, listener)
        return allowed

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

        amqtt calls this right after a session goes live, so it is also where a login
        that raced with a recheck is checked again (``AuthCache.generation`` moved since
        its lookup began: the answer may predate a revocation), before anything queued
        is handed over.
        """
        handler = self._get_handler(session)
        if handler is None:
            return
        stale = session.attributes.get(AUTH_GENERATION_KEY) != self._xc_runtime.cache.generation
        if stale and await self.reauthenticate(session, handler):
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
        consumer = self._xc_internal.get(topic) if topic else None
        if consumer is not None and message is not None and topic:
            # For the broker itself: after the publish ACL, never routed nor retained.
            principal = principal_of(client_session)
            if principal is not None and check_topic(
                self._xc_runtime, client_session, topic, Action.PUBLISH
            ):
                consumer(principal, bytes(message.data))
            return True
        packet = getattr(message, "publish_packet", None)
        if packet is not None and packet.retain_flag and topic:
            principal = principal_of(client_session)
            if principal is None or not self._xc_runtime.acl.can_retain(principal, topic):
                log.debug("%r: not retaining message on %r", client_session.client_id, topic)
                packet.retain_flag = False  # delivered if allowed, but never stored
        delivered: bool = await super()._handle_message_delivery(
            client_session, handler, wait_deliver
        )
        return delivered




_TESTED_AMQTT = "0.12."


def check_amqtt_version() -> None:
    """Warn when amqtt is not the series whose internals HardenedAmqttBroker overrides."""
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

