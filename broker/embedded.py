"""The embedded MQTT broker: amqtt with xcloud's authentication and topic ACL.

The coordinator (or ``xcloud up``) runs it in-process. Identity is the MQTT username,
the token is the password; the caller passes an ``Authenticator`` (the broker knows
nothing about databases) and every publish, subscribe and delivery is checked against
``broker.acl.Acl``.

This module is the lifecycle (settings, ports, its own thread or the caller's loop,
start/stop) and the public face. The parts live beside it:

- ``broker.amqtt_plugins``: the auth and topic plugins, their runtime, credential cache
  and denial log;
- ``broker.hardened_amqtt``: ``HardenedAmqttBroker``, the overrides of amqtt 0.12.1
  internals a security boundary needs (payload limit, keep-alive, authenticate first,
  retained and queued messages, socket hygiene), and internal topics;
- ``broker.revocation``: re-checking live sessions after a revoke
  (``EmbeddedBroker.recheck_principals`` and the ``broker.recheck`` wire trigger).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import socket
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from amqtt.broker import Broker
from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import BrokerError as AmqttBrokerError

from broker.acl import Acl, Principal
from broker.amqtt_plugins import (
    PRINCIPAL_KEY,
    AuthCache,
    Authenticator,
    DenialLog,
    PluginRuntime,
    XcloudAuthPlugin,
    XcloudTopicPlugin,
    check_topic,
    plugin_config,
    principal_of,
)
from broker.errors import BrokerError, PortInUseError
from broker.hardened_amqtt import HardenedAmqttBroker, PayloadTooLargeError, check_amqtt_version
from broker.revocation import SessionRecheck
from schemas.topics import DEFAULT_ROOT, Topics

__all__ = [
    "PRINCIPAL_KEY",
    "Authenticator",
    "BrokerSettings",
    "EmbeddedBroker",
    "PayloadTooLargeError",
    "XcloudAuthPlugin",
    "XcloudTopicPlugin",
    "check_port_free",
    "check_topic",
    "principal_of",
]

log = logging.getLogger(__name__)

# The names these had when they lived here (tests and older callers import them).
_AuthCache = AuthCache
_DenialLog = DenialLog
_Runtime = PluginRuntime
_XcloudAmqttBroker = HardenedAmqttBroker

T = TypeVar("T")

_NOISY_LOGGERS = ("amqtt", "transitions", "websockets")
_CALL_TIMEOUT_S = 30.0
SHUTDOWN_S = 5.0  # amqtt shutdown bound (stop() closes anyway after it)


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
        self._broker: HardenedAmqttBroker | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._runtime: PluginRuntime | None = None
        self._recheck: SessionRecheck | None = None
        self._broker_loop: asyncio.AbstractEventLoop | None = None
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
        """Forget cached logins (a revoked token then fails at its next CONNECT; to cut
        its live connections too, use ``recheck_principals``)."""
        if self._runtime is not None:
            self._runtime.cache.clear()

    # -- revocation and introspection (any thread) ---------------------------------------
    def recheck_principals(self, ids: list[str]) -> int:
        """Re-authenticate the live sessions of these principals; cut those that fail.

        Drops the principals' cached logins, checks every live session whose username
        is one of ``ids`` against the authenticator (the check a new CONNECT gets) and
        disconnects at once each that no longer yields the same principal (revoked,
        token rotated, role changed). Returns how many connections were cut. Callable
        from any thread but the broker's own loop (there, ``await recheck(ids)``).
        """
        return self._call(self.recheck(ids))

    async def recheck(self, ids: list[str]) -> int:
        """``recheck_principals`` for code running on the broker's loop."""
        recheck = self._recheck
        if recheck is None:
            return 0
        return await recheck.recheck(ids)

    def connected_clients(self) -> dict[str, str]:
        """Client id -> principal id of every live connection (a snapshot, any thread)."""

        async def snapshot() -> dict[str, str]:
            broker = self._broker
            if broker is None:
                return {}
            out = {}
            for session, _handler in broker.live_sessions():
                principal = principal_of(session)
                if principal is not None and session.client_id:
                    out[session.client_id] = principal.id
            return out

        return self._call(snapshot())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the broker's loop from another thread and wait for it."""
        loop = self._broker_loop
        if loop is None or self._broker is None:
            coro.close()
            raise BrokerError("embedded broker is not running")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise BrokerError("called on the broker's own loop: await the coroutine instead")
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError as err:  # the loop closed under us: the broker is stopping
            coro.close()
            raise BrokerError("embedded broker is not running") from err
        try:
            return future.result(_CALL_TIMEOUT_S)
        except concurrent.futures.TimeoutError as err:
            future.cancel()
            raise BrokerError(f"embedded broker did not answer within {_CALL_TIMEOUT_S} s") from err
        except concurrent.futures.CancelledError as err:
            raise BrokerError("embedded broker stopped before it answered") from err

    # -- in a running loop -------------------------------------------------------------
    def _config(self, runtime: PluginRuntime) -> BrokerConfig:
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
        return BrokerConfig(
            listeners=listeners,
            plugins=plugin_config(runtime),
            session_expiry_interval=s.session_expiry_s,
            timeout_disconnect_delay=0,
        )

    def _on_recheck_trigger(self, sender: Principal, payload: bytes) -> None:
        # Bound at start(); the trigger can only fire while the broker runs.
        if self._recheck is not None:
            self._recheck.on_trigger(sender, payload)

    async def start(self) -> None:
        """Start listening; raises PortInUseError or BrokerError when it cannot."""
        if self._broker is not None:
            raise BrokerError("embedded broker already started")
        s = self.settings
        if s.quiet_amqtt_logs:
            _quiet_noisy_loggers()
        check_amqtt_version()
        check_port_free(s.host, s.port)
        if s.ws_port is not None:
            check_port_free(s.host, s.ws_port)
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, s.auth_workers), thread_name_prefix="xcloud-broker-auth"
        )
        runtime = PluginRuntime(
            acl=self.acl,
            authenticator=self._authenticator,
            allow_anonymous=s.allow_anonymous,
            executor=executor,
            cache=AuthCache(s.auth_cache_ttl_s),
        )
        recheck_topic = Topics(s.root).broker_recheck
        broker = HardenedAmqttBroker(
            self._config(runtime),
            runtime,
            max_payload=s.max_payload,
            keepalive_factor=s.keepalive_factor,
            connect_timeout_s=s.connect_timeout_s,
            internal={recheck_topic: self._on_recheck_trigger},
        )
        recheck = SessionRecheck(broker, runtime.cache, recheck_topic)
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
        self._recheck, self._broker_loop = recheck, asyncio.get_running_loop()
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
        recheck, self._recheck = self._recheck, None
        try:
            if recheck is not None:
                await recheck.close()
            # amqtt's shutdown waits on its client handlers; one stuck on a slow or
            # half-closed connection must not hold the whole stop
            await asyncio.wait_for(broker.shutdown(), SHUTDOWN_S)
        except TimeoutError:
            log.warning("the embedded broker did not shut down within %g s; closing anyway",
                        SHUTDOWN_S)
            self._drop_everyone(broker)
        except Exception:
            log.exception("error while shutting down the embedded broker")
        finally:
            if self._executor is not None:
                # an authentication still running (a slow store) is not waited for
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
            self._runtime = None
            self._broker_loop = None

    @staticmethod
    def _drop_everyone(broker: Broker) -> None:
        """Close the listeners and abort every client's connection at once: after a stuck
        shutdown the sockets stayed open, so clients saw no disconnect (until keepalive)
        and a broker "restarted" on the same port was not reconnected to."""
        for server in list(getattr(broker, "_servers", {}).values()):
            with contextlib.suppress(Exception):
                if server.instance is not None:
                    server.instance.close()
        for _session, handler in list(getattr(broker, "_sessions", {}).values()):
            writer = getattr(getattr(handler, "writer", None), "_writer", None)
            transport = getattr(writer, "transport", None)
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.abort()

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
                    _end_leftover_tasks(loop)
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
        with contextlib.suppress(RuntimeError):  # loop closed: the thread is ending by itself
            loop.call_soon_threadsafe(task.cancel)
        thread.join(timeout)
        if thread.is_alive():
            raise BrokerError(f"embedded broker thread did not stop within {timeout} s")
        self._thread = self._loop = self._task = None

    def __enter__(self) -> EmbeddedBroker:
        self.start_in_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_in_thread()


def _end_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what amqtt left running at its stop (a client handler's waits on its
    queues, its broadcast loop) and let it end, bounded, before the loop closes, as
    ``asyncio.run`` does: a task still pending on a closed loop, collected later, reports
    "Event loop is closed" into whatever code the collection happens to interrupt."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=SHUTDOWN_S))
