"""The bus: the one paho-mqtt 2.x wrapper every xcloud component uses.

Why a wrapper: paho calls back on its network thread, and blocking there deadlocks
(eclipse/paho.mqtt.python#527). The bus hands every message to a *lane* (a thread with
a queue, one per lane name, so order is kept within a lane), decodes and validates it
there, and only then calls the handler. Replies to our own requests are matched by
correlation id and complete a future, so a handler may itself make requests.

Inboxes: a component's inbox is ``.../inbox/+`` and the last level names the sender
(see ``schemas.topics``); ``Incoming.sender`` carries it. Works unchanged against the
embedded amqtt broker and any MQTT 3.1.1 broker (Mosquitto, EMQX, ...).
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from broker.bus_lanes import Lanes
from broker.bus_types import (
    BusError,
    Handler,
    Incoming,
    Lane,
    MessageTooLarge,
    RawHandler,
    RemoteError,
    RequestTimeout,
    Will,
)
from broker.config import BusConfig
from broker.link import (
    CLIENT_ID_CONTEXT,
    LinkState,
    backoff_delay,
    parse_broker_url,
    private_client_id,
    set_nodelay,
)
from broker.reply_routing import answer_inbox
from broker.subscriptions import Subscription, SubscriptionTable
from schemas.codec import Envelope, decode, encode, envelope, error_for
from schemas.errors import WireError
from schemas.messages import Body, Error
from schemas.topics import Topics

__all__ = [
    "CLIENT_ID_CONTEXT", "Bus", "BusError", "Handler", "Incoming", "Lane", "LinkState",
    "MessageTooLarge", "RawHandler", "RemoteError", "RequestTimeout", "Will",
    "backoff_delay", "parse_broker_url", "private_client_id",
]

log = logging.getLogger(__name__)


class Bus:
    """A connected MQTT client with typed messages, lanes and request/reply.

    ``inbox`` is the base inbox topic this component owns (replies to its requests go
    there); ``None`` for a component that only publishes. ``coordinator`` is the
    coordinator's principal id, where a worker or client knows it: only requests from it
    are answered in the coordinator's inbox (``reply_inbox``).
    """

    def __init__(
        self,
        config: BusConfig,
        *,
        client_id: str | None = None,
        inbox: str | None = None,
        will: Will | None = None,
        persistent_session: bool = False,
        coordinator: str | None = None,
    ) -> None:
        self.config = config
        self.coordinator = coordinator
        self.topics = Topics(config.root)
        self.principal = config.principal
        self.inbox = inbox
        # ``client_id`` names the connection (a worker's, a client session's); the broker
        # sees ``mqtt_client_id``: for a given name, the name plus a keyed hash of our
        # token, so that the id stays stable (persistent sessions resume) but nobody who
        # learns or guesses the name can take our connection over on a broker that lets
        # the last CONNECT with an id win (Mosquitto). Generated names are random anyway.
        self.client_id = client_id or f"{config.principal or 'anon'}-{uuid.uuid4().hex[:8]}"
        self.mqtt_client_id = (private_client_id(client_id, config.token) if client_id
                               else self.client_id)
        self._transport, self._host, self._port, tls = parse_broker_url(config.url)
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.mqtt_client_id,
            clean_session=not persistent_session,
            transport=self._transport,  # type: ignore[arg-type]
            reconnect_on_failure=True,
        )
        if tls:
            self._client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        if config.principal:
            self._client.username_pw_set(config.principal, config.token or None)
        if will is not None:
            self._client.will_set(will.topic, encode(envelope(will.body)), will.qos, will.retain)
        # Back-off with jitter: paho sleeps its "min delay" before each reconnect, and the
        # disconnect and connect-failure callbacks (which run just before that sleep) set
        # it for the attempt to come (``_next_backoff``), doubling up to reconnect_max_s.
        self._rng = random.Random()
        self._attempt = 0
        self._client.max_inflight_messages_set(1000)
        self._client.suppress_exceptions = True  # a callback bug must not kill the loop
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._subs = SubscriptionTable()
        self._lanes = Lanes(self.client_id, run_hooks=self._run_connect_hooks,
                            deliver=self._deliver)
        self._pending: dict[str, Future[Envelope[Any]]] = {}
        self._inbox_handlers: dict[str, tuple[Handler, Lane]] = {}
        self._lock = threading.RLock()
        self.connected = threading.Event()
        self._epoch = 0
        self._since = 0.0
        self._ready_at = 0.0
        self._first_connect = threading.Event()
        self._connect_hooks: list[Callable[[], None]] = []
        self._last_refusal: str | None = None
        self._ready_mid: int | None = None
        self._started = False
        self._stopping = False
        self.reconnects = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self, wait: bool = True, timeout: float | None = None) -> None:
        """Connect in the background; with ``wait``, block until the first CONNACK.

        Raises BusError when the broker refuses our credentials or is not reachable in
        time. Afterwards paho reconnects by itself with backoff, and the bus
        resubscribes everything on each reconnect.
        """
        if self._started:
            return
        self._started = True
        if self.inbox:
            self._subscribe_internal(
                Subscription(f"{self.inbox}/+", 1, Lane.INBOX, handler=self._dispatch_inbox)
            )
        try:
            self._client.connect_async(self._host, self._port, keepalive=self.config.keepalive)
        except (OSError, ValueError) as err:
            raise BusError(f"cannot connect to broker {self.config.url}: {err}") from err
        self._client.loop_start()
        if wait:
            self.wait_connected(timeout if timeout is not None else self.config.connect_timeout_s)

    @property
    def last_refusal(self) -> str | None:
        """Why the broker refused our last CONNECT (bad credentials, ...), if it did."""
        return self._last_refusal

    def wait_connected(self, timeout: float) -> None:
        """Block until connected. On refusal or timeout the bus is stopped and BusError
        raised; daemons that must keep retrying use ``start(wait=False)`` instead."""
        deadline = time.monotonic() + timeout
        while not self.connected.wait(0.05):
            if self._last_refusal and not self.connected.is_set():
                self.stop()
                raise BusError(
                    f"broker {self.config.url} refused principal "
                    f"{self.principal or '(anonymous)'}: {self._last_refusal}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise BusError(
                    f"no MQTT broker answered at {self.config.url} within {timeout:.0f}s "
                    "(is `xcloud up` or the broker running? check --broker)"
                )

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` has begun: a request under way fails ("bus stopped") and a
        new one is never answered."""
        return self._stopping

    def stop(self, *, publish: list[tuple[str, Body, int, bool]] | None = None) -> None:
        """Publish any last messages, disconnect cleanly and stop the lanes."""
        if self._stopping:
            return
        self._stopping = True
        self._lanes.close()  # a message still being dispatched starts no lane now
        for topic, body, qos, retain in publish or []:
            if self.connected.is_set():
                try:
                    info = self.publish(topic, body, qos=qos, retain=retain)
                except BusError:
                    continue  # logged; the rest still goes out
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(2.0)
        network = self._client._thread  # paho's network thread (None: never started)
        try:
            self._client.disconnect()
        finally:
            # paho race: after disconnect() its thread may end on its own and clear
            # ``_thread`` between loop_stop's check and its join (AttributeError)
            with contextlib.suppress(AttributeError):
                self._client.loop_stop()
            if network is not None and network is not threading.current_thread():
                network.join(5)
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for fut in pending:
            if not fut.done():  # a cancelled one stays cancelled
                with contextlib.suppress(InvalidStateError):
                    fut.set_exception(BusError("bus stopped"))
        self._lanes.stop()
        self.connected.clear()

    def __enter__(self) -> Bus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def backlog(self, lane: Lane) -> int:
        """Messages received but not yet handled on ``lane`` (0 for an unknown lane)."""
        return self._lanes.backlog(lane)

    def on_connected(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` (on a lane, not the network thread) after every (re)connect."""
        self._connect_hooks.append(hook)

    def link_state(self) -> LinkState:
        """Are we connected, since when, and how many connections there have been."""
        return LinkState(self.connected.is_set(), self._epoch, self._since, self._ready_at)

    def _next_backoff(self) -> None:
        """Set the delay paho waits before its next reconnect attempt (jittered)."""
        delay = backoff_delay(self._attempt, self.config.reconnect_min_s,
                              self.config.reconnect_max_s, self._rng)
        self._attempt += 1
        # paho annotates whole seconds but sleeps fractions just as well
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    # -- subscribe / publish -------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1,
                  lane: Lane = Lane.DEFAULT, types: tuple[str, ...] | None = None) -> None:
        """Deliver validated messages matching ``topic_filter`` to ``handler`` on ``lane``.

        With ``types`` only those message types reach the handler; a valid message of
        another type on that topic (a heartbeat on a caps topic, say) is dropped.
        """
        self._subscribe_internal(Subscription(
            topic_filter, qos, Lane(lane), handler=handler,
            types=frozenset(types) if types else None))

    def subscribe_raw(self, topic_filter: str, handler: RawHandler, *, qos: int = 1,
                      lane: Lane = Lane.DEFAULT) -> None:
        """Deliver undecoded payloads (for tools and benchmarks that measure the wire)."""
        self._subscribe_internal(Subscription(topic_filter, qos, Lane(lane),
                                               raw_handler=handler))

    def on_inbox(self, message_type: str, handler: Handler, *,
                 lane: Lane = Lane.DEFAULT) -> None:
        """Handle messages of ``message_type`` arriving in this component's inbox."""
        if not self.inbox:
            raise BusError("this bus has no inbox")
        self._inbox_handlers[message_type] = (handler, Lane(lane))

    def topic_filters(self) -> list[str]:
        """What this bus subscribes to (its inbox included)."""
        return [sub.topic_filter for sub in self._subs.all()]

    def unsubscribe(self, topic_filter: str) -> None:
        self._subs.remove(topic_filter)
        self._client.unsubscribe(topic_filter)

    def _subscribe_internal(self, sub: Subscription) -> None:
        self._subs.add(sub)
        self._lanes.lane(sub.lane)
        if self.connected.is_set():
            self._client.subscribe(sub.topic_filter, sub.qos)

    def publish(self, topic: str, body: Body | Envelope[Any], *, qos: int = 1,
                retain: bool = False) -> mqtt.MQTTMessageInfo:
        env = body if isinstance(body, Envelope) else envelope(body)
        return self.publish_bytes(topic, encode(env), qos=qos, retain=retain)

    def publish_bytes(self, topic: str, payload: bytes, *, qos: int = 1,
                      retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Hand ``payload`` to paho; raise ``MessageTooLarge`` if it is over
        ``bus.max_payload``.

        Checked here, before paho queues it: a broker drops the connection of a client that
        sends an oversized message (amqtt; Mosquitto with ``max_packet_size``), and paho
        would send a queued QoS 1 message again after every reconnect, for ever.
        """
        if len(payload) > self.config.max_payload:
            err = MessageTooLarge(len(payload), self.config.max_payload, topic)
            log.warning("not sent: %s", err)
            raise err
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def send(self, base_inbox: str, body: Body | Envelope[Any] | bytes, *, qos: int = 1
             ) -> mqtt.MQTTMessageInfo:
        """Publish into someone's inbox under our own sender id (``bytes``: an envelope
        encoded once for several topics)."""
        topic = self.topics.inbox_for(base_inbox, self.principal)
        if isinstance(body, bytes):
            return self.publish_bytes(topic, body, qos=qos)
        return self.publish(topic, body, qos=qos)

    # -- request / reply -----------------------------------------------------------

    def request(self, base_inbox: str, body: Body, *, timeout: float | None = None,
                raise_errors: bool = True) -> Envelope[Any]:
        """Send a request and wait for its reply; safe to call from a handler."""
        fut = self.request_async(base_inbox, body)
        limit = self.config.request_timeout_s if timeout is None else timeout
        try:
            reply = fut.result(limit)
        except FutureTimeout:
            raise RequestTimeout(
                f"no reply to {body.TYPE} from {base_inbox} within {limit:.1f}s"
            ) from None
        finally:
            with self._lock:
                for key, value in list(self._pending.items()):
                    if value is fut:
                        del self._pending[key]
        if raise_errors and isinstance(reply.body, Error):
            raise RemoteError(reply.body, body.TYPE)
        return reply

    def request_async(self, base_inbox: str, body: Body) -> Future[Envelope[Any]]:
        env, fut = self.request_carried(body)
        try:
            self.send(base_inbox, env)
        except BaseException:
            self._forget_pending(env.id)
            raise
        return fut

    def request_carried(self, body: Body) -> tuple[Envelope[Any], Future[Envelope[Any]]]:
        """A request that another message carries (``attempt.recorded`` carries
        ``job.assign``), and the future its reply settles, as ``request_async``'s."""
        if not self.inbox:
            raise BusError("this bus has no inbox to receive replies")
        env = envelope(body, reply_to=self.inbox)
        fut: Future[Envelope[Any]] = Future()
        with self._lock:
            self._pending[env.id] = fut
        # a caller that cancels (or a reply that settles it) forgets it here
        mid = env.id
        fut.add_done_callback(lambda _f: self._forget_pending(mid))
        return env, fut

    def _forget_pending(self, mid: str) -> None:
        with self._lock:
            self._pending.pop(mid, None)

    def reply(self, request: Incoming, body: Body, *, qos: int = 1) -> None:
        """Answer a request in its sender's own inbox (``reply_inbox``); nothing when it
        asked for no reply.

        A reply that would be over ``bus.max_payload`` is never built: the requester gets
        an ``error`` ``too_large`` instead, and the refusal is logged.
        """
        base = self.reply_inbox(request)
        if base is None:
            return
        payload = encode(envelope(body, re=request.message.id))
        limit = self.config.max_payload
        if len(payload) > limit:
            log.warning("answered %s from %s with too_large: its %s would be %d bytes, over "
                        "bus.max_payload (%d)", request.message.type, request.sender,
                        body.TYPE, len(payload), limit)
            payload = encode(envelope(Error(
                code="too_large",
                message=(f"the answer to {request.message.type} would be {len(payload)} "
                         f"bytes, more than one message may carry ({limit}); ask for less"),
                detail={"size": len(payload), "limit": limit}), re=request.message.id))
        self.publish_bytes(self.topics.inbox_for(base, self.principal), payload, qos=qos)

    def reply_inbox(self, request: Incoming) -> str | None:
        """The base inbox an answer to ``request`` goes to: always its sender's own.

        The sender is the inbox topic's last level, which the broker authenticated (on a
        worker's own status, caps or heartbeat topic: that worker); ``reply_to`` only
        tells which kind of inbox it has (a client's, a worker's, or the coordinator's).
        A ``reply_to`` naming another principal's inbox is answered in the sender's own
        instead (and logged), so nobody can aim our replies at a third party. The
        coordinator's inbox is used only for a request from the coordinator (the
        principal given as ``coordinator``; any, when the bus was told none, except on the
        coordinator's own bus, which answers there only itself). None: no answer.
        """
        return self._answer_inbox(request.sender or self.topics.publisher_of(request.topic),
                                  request.message.reply_to, request.message.type)

    def _answer_inbox(self, sender: str | None, reply_to: str | None,
                      what: str | None) -> str | None:
        return answer_inbox(self.topics, sender, reply_to, what, own_principal=self.principal,
                            own_inbox=self.inbox, coordinator=self.coordinator)

    def reply_error(self, request: Incoming, code: str, message: str,
                    detail: dict[str, Any] | None = None) -> None:
        self.reply(request, Error(code=code, message=message, detail=detail))

    # -- paho callbacks (network thread: never block here) -------------------------

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any,
                    reason: ReasonCode, _properties: Any) -> None:
        if reason.is_failure:
            self._last_refusal = str(reason)
            log.warning("broker %s refused connection: %s", self.config.url, reason)
            return
        self._last_refusal = None
        self._attempt = 0  # the next disconnect starts the back-off afresh
        set_nodelay(client)
        subs = self._subs.all()
        if self._first_connect.is_set():
            self.reconnects += 1
            log.info("reconnected to %s", self.config.url)
        if subs:
            # Ready only once the broker has acknowledged the (re)subscriptions: a peer
            # may otherwise send us a request that the broker routes to nobody.
            _, mid = client.subscribe([(s.topic_filter, s.qos) for s in subs])
            self._ready_mid = mid
        else:
            self._ready()

    def _ready(self) -> None:
        self._ready_mid = None
        self._ready_at = time.monotonic()
        self._since = time.time()
        self._epoch += 1
        self._first_connect.set()
        self.connected.set()
        if self._connect_hooks:
            self._lanes.put_hooks()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any,
                       reason: ReasonCode, _properties: Any) -> None:
        self.connected.clear()
        self._next_backoff()
        if not self._stopping:
            log.warning("lost broker %s (%s); reconnecting", self.config.url, reason)

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        self._next_backoff()  # the broker is still away: wait longer before the next try

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], _properties: Any) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.warning("broker refused a subscription: %s", rc)
        if mid == self._ready_mid:
            self._ready()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # An exception here would kill paho's network thread for good: never let one out.
        try:
            self._route(msg)
        except Exception:
            log.exception("failed to route a message on %s", msg.topic)

    def _route(self, msg: mqtt.MQTTMessage) -> None:
        if self.inbox and msg.topic.startswith(self.inbox + "/"):
            if msg.retain:
                # A retained request would replay on every reconnect; some brokers
                # (Mosquitto) cannot forbid storing them, so inboxes ignore them.
                log.warning("ignored a retained message in inbox %s", msg.topic)
                return
            if self._complete_reply(msg):
                return
        sub = self._subs.match(msg.topic)
        if sub is None:
            return
        self._lanes.put(sub, msg)

    def _complete_reply(self, msg: mqtt.MQTTMessage) -> bool:
        """Resolve a pending request with this message if it is its reply."""
        if not self._pending or b'"re"' not in msg.payload:
            return False
        try:
            env = decode(bytes(msg.payload), topic=msg.topic,
                         max_payload=self.config.max_payload)
        except WireError:
            return False
        if env.re is None:
            return False
        with self._lock:
            fut = self._pending.pop(env.re, None)
        if fut is None:
            return False
        if not fut.done():
            fut.set_result(env)
        return True

    # -- on the lanes (bus_lanes.Lanes runs these, never on the network thread) -------

    def _run_connect_hooks(self) -> None:
        for hook in list(self._connect_hooks):
            hook()

    def _deliver(self, sub: Subscription, msg: mqtt.MQTTMessage) -> None:
        sender = self.topics.sender_of(msg.topic)
        try:
            env = decode(bytes(msg.payload), topic=msg.topic,
                         max_payload=self.config.max_payload)
        except WireError as err:
            self._reject(err, sender)
            return
        assert sub.handler is not None
        if sub.types is not None and env.type not in sub.types:
            log.warning("dropped %s on %s from %s: not a message type of this topic",
                        env.type, msg.topic, sender or "?")
            self.reply_error(Incoming(msg.topic, env, sender), "invalid",
                             f"{env.type} is not accepted on {msg.topic}")
            return
        sub.handler(Incoming(msg.topic, env, sender, bool(msg.retain), msg.timestamp))

    def _reject(self, err: WireError, sender: str | None) -> None:
        """An invalid message: answer with an error when we can, else log and drop."""
        log.warning("dropped message on %s from %s: %s", err.topic, sender or "?", err)
        if not err.message_id:
            return
        publisher = sender or (self.topics.publisher_of(err.topic) if err.topic else None)
        base = self._answer_inbox(publisher, err.reply_to, err.message_type)
        if base is not None:
            self.send(base, envelope(error_for(err), re=err.message_id))

    def deliver_carried(self, incoming: Incoming) -> None:
        """A message that another carried (``attempt.recorded`` carries ``job.assign``),
        already validated and its sender the carrier's: handled as if it had come to our
        inbox alone (its type's inbox handler, on that handler's lane)."""
        self._dispatch_inbox(incoming)

    def _dispatch_inbox(self, incoming: Incoming) -> None:
        entry = self._inbox_handlers.get(incoming.message.type)
        if entry is None:
            if incoming.message.re is not None:
                return  # a late reply to a request that already timed out
            self.reply_error(incoming, "unsupported",
                             f"{self.principal or 'this component'} does not handle "
                             f"{incoming.message.type}")
            return
        handler, lane = entry
        if lane is Lane.INBOX:
            handler(incoming)
        else:
            self._lanes.put_incoming(lane, handler, incoming)

