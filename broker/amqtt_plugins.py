"""xcloud's amqtt plugins: who may connect (``XcloudAuthPlugin``) and where (``XcloudTopicPlugin``).

amqtt 0.12 loads plugins from the ``plugins`` dict of its config, keyed by dotted class
path, and hydrates each plugin's ``Config`` dataclass from the value with dacite. A field
typed ``Any`` passes an object through untouched, so each plugin instance receives its
broker's ``PluginRuntime`` (ACL, authenticator, credential cache) directly: no
module-level registry. The plugins also work in an unmodified amqtt ``Broker``;
``broker.hardened_amqtt`` adds the fixes a security boundary needs on top.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from broker.acl import Acl, Principal, Role
from broker.errors import BrokerError
from schemas.topics import valid_principal_id

log = logging.getLogger(__name__)

Authenticator = Callable[[str, str], Principal | None]
"""Given MQTT username and password (token), the principal, or None to refuse."""

PRINCIPAL_KEY = "xcloud.principal"
"""Key of the authenticated ``Principal`` in ``amqtt.session.Session.attributes``."""

AUTH_GENERATION_KEY = "xcloud.auth_generation"
"""Key of the ``AuthCache.generation`` a session's credentials were last checked in."""


class AuthCache:
    """Successful logins for a short TTL, keyed by (user, sha256(token)).

    Connect storms (a restarted grid reconnecting at once) then cost one lookup per
    principal, not one per connection. Failures are never cached, so a newly issued
    token works at once; a revoked token keeps working for at most ``ttl`` seconds
    unless the principal is forgotten (``forget``/``clear``, which a recheck does).
    ``generation`` changes on every forget, so a lookup that was in flight across one
    can tell that its answer may predate the revocation.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.generation = 0
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

    def forget(self, users: Iterable[str]) -> None:
        """Drop every cached login of these users."""
        gone = set(users)
        self.generation += 1
        self._entries = {k: v for k, v in self._entries.items() if k[0] not in gone}

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()


class DenialLog:
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
class PluginRuntime:
    """Everything the plugins of one broker need, handed to them through plugin Config."""

    acl: Acl
    authenticator: Authenticator
    allow_anonymous: bool
    executor: concurrent.futures.ThreadPoolExecutor
    cache: AuthCache
    denials: DenialLog = field(default_factory=DenialLog)

    async def resolve(self, session: Session) -> Principal | None:
        """The principal for the session's credentials, or None to refuse the CONNECT."""
        user = session.username
        token = session.password
        generation = self.cache.generation
        session.attributes[AUTH_GENERATION_KEY] = generation
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
        if principal is not None:
            return principal
        principal = await self._lookup(user, token)
        if principal is not None and self.cache.generation == generation:
            # Not cached when a recheck forgot logins meanwhile: this answer may predate
            # the revocation, and the session is checked again once it is live.
            self.cache.put(key, principal)
        # A presented but wrong token is refused even in anonymous mode: silently
        # downgrading a misconfigured worker to an anonymous client would hide the error.
        return principal

    async def _lookup(self, user: str, token: str) -> Principal | None:
        """Ask the authenticator in the thread pool; None on any doubt."""
        loop = asyncio.get_running_loop()
        try:
            # The authenticator may hit a database: keep the broker's loop free.
            principal = await loop.run_in_executor(self.executor, self.authenticator, user, token)
        except Exception:
            log.exception("authenticator failed for user %r; refusing the connection", user)
            return None
        if principal is not None and not isinstance(principal, Principal):
            log.error(
                "authenticator returned %r for %r, not a Principal; refusing", principal, user
            )
            return None
        if principal is not None and principal.id != user:
            log.error("authenticator mapped user %r to principal %r; refusing", user, principal.id)
            return None
        return principal


def principal_of(session: Session | None) -> Principal | None:
    """The principal the auth plugin attached to an amqtt session, if any."""
    if session is None:
        return None
    p = session.attributes.get(PRINCIPAL_KEY)
    return p if isinstance(p, Principal) else None


def _runtime_of(plugin: Any, name: str) -> PluginRuntime:
    runtime = getattr(plugin.config, "runtime", None)
    if not isinstance(runtime, PluginRuntime):
        raise BrokerError(f"{name} needs its broker runtime in the plugin config")
    return runtime


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
        self.runtime = _runtime_of(self, "XcloudAuthPlugin")

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
        if (
            session.will_flag
            and session.will_retain
            and not self.runtime.acl.can_retain(principal, session.will_topic or "")
        ):
            log.info("%s: last will on %r will not be retained", principal.id, session.will_topic)
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
        self.runtime = _runtime_of(self, "XcloudTopicPlugin")

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        return check_topic(self.runtime, session, topic, action)


def check_topic(
    runtime: PluginRuntime, session: Session | None, topic: str | None, action: Action | None
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


def plugin_config(runtime: PluginRuntime) -> dict[str, dict[str, Any]]:
    """The ``plugins`` entry of an amqtt ``BrokerConfig``: only our two plugins.

    No event/packet loggers (a task per packet) and no ``$SYS`` plugin.
    """
    return {
        f"{__name__}.{XcloudAuthPlugin.__name__}": {"runtime": runtime},
        f"{__name__}.{XcloudTopicPlugin.__name__}": {"runtime": runtime},
    }
