"""Revocation that reaches live connections: re-check principals, cut who no longer passes.

Revoking a token in the store stops new CONNECTs (after the credential cache forgets
it), but MQTT authenticates only at CONNECT: a revoked principal already connected
would stay connected. ``SessionRecheck.recheck`` forgets the named principals' cached
logins and re-authenticates each of their live sessions against the broker's own
authenticator, cutting those that no longer pass.

Its wire trigger is a ``broker.recheck`` message on ``Topics.broker_recheck``, which the
broker consumes itself (``HardenedAmqttBroker`` internal topic). Only coordinator and
admin principals may publish there (``broker.acl``). Since the broker re-checks against
its own authenticator, a forged or replayed trigger can only cost work, never cut a
valid principal; that work is bounded: each sender is rate-limited, principals named
by several messages are coalesced into one pending set of bounded size, and one batch
runs at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from broker.acl import Principal
from broker.amqtt_plugins import AuthCache, principal_of
from broker.hardened_amqtt import HardenedAmqttBroker
from broker.rate_limit import TokenBuckets
from schemas.codec import decode
from schemas.errors import WireError
from schemas.messages import BrokerRecheck
from schemas.topics import valid_principal_id

log = logging.getLogger(__name__)

MAX_TRIGGER_BYTES = 64 * 1024
"""A ``broker.recheck`` names at most 64 ids of at most 128 characters: far below this."""


SenderRateLimit = TokenBuckets
"""A token bucket per sender: ``burst`` at once, then ``rate`` per second
(``broker.rate_limit``, shared with the coordinator's and workers' request guards)."""


class SessionRecheck:
    """Re-authenticates the live sessions of named principals on one hardened broker.

    Runs on the broker's event loop: ``recheck`` is awaited there, ``on_trigger`` is the
    broker's consumer of the ``broker.recheck`` topic.
    """

    RATE_PER_S = 5.0
    BURST = 20
    MAX_PENDING = 1024

    def __init__(self, broker: HardenedAmqttBroker, cache: AuthCache, topic: str) -> None:
        self.broker = broker
        self.cache = cache
        self.topic = topic
        self.limit = SenderRateLimit(self.RATE_PER_S, self.BURST)
        self._pending: set[str] = set()
        self._senders: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._last_drop_log = -float("inf")

    async def recheck(self, ids: Iterable[str]) -> int:
        """Forget these principals' cached logins, re-check their live sessions against
        the authenticator and cut each that no longer passes; how many were cut."""
        wanted = {i for i in ids if isinstance(i, str) and valid_principal_id(i)}
        if not wanted:
            return 0
        self.cache.forget(wanted)
        targets = [
            (session, handler)
            for session, handler in self.broker.live_sessions()
            if (p := principal_of(session)) is not None and p.id in wanted
        ]
        if not targets:
            return 0
        outcomes = await asyncio.gather(
            *(self.broker.reauthenticate(s, h) for s, h in targets), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                log.error("recheck of a session failed", exc_info=outcome)
        return sum(1 for outcome in outcomes if outcome is True)

    # -- the wire trigger ---------------------------------------------------------------
    def on_trigger(self, sender: Principal, payload: bytes) -> None:
        """A ``broker.recheck`` PUBLISH that passed the ACL: queue its principals."""
        if not self.limit.allow(sender.id):
            self._dropped("%s sends broker.recheck faster than allowed; dropped", sender.id)
            return
        try:
            env = decode(payload, topic=self.topic, max_payload=MAX_TRIGGER_BYTES)
        except WireError as err:
            log.warning("dropped broker.recheck from %s: %s", sender.id, err)
            return
        body = env.body
        if not isinstance(body, BrokerRecheck):
            log.warning("dropped %s from %s on %s: not a broker.recheck", env.type, sender.id,
                        self.topic)
            return
        fresh = set(body.principals) - self._pending
        if len(self._pending) + len(fresh) > self.MAX_PENDING:
            self._dropped("broker.recheck from %s dropped: %d principals already pending",
                          sender.id, len(self._pending))
            return
        self._pending |= fresh
        self._senders.add(sender.id)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        """Run the pending principals in batches, one batch at a time."""
        while self._pending:
            batch, self._pending = self._pending, set()
            senders, self._senders = self._senders, set()
            try:
                cut = await self.recheck(batch)
            except Exception:
                log.exception("broker.recheck of %d principals failed", len(batch))
                continue
            log.info("broker.recheck from %s: %d principals re-checked, %d connections cut",
                     ", ".join(sorted(senders)), len(batch), cut)

    async def close(self) -> None:
        """Stop a batch in progress (at broker shutdown)."""
        task, self._task = self._task, None
        self._pending.clear()
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _dropped(self, msg: str, *args: object) -> None:
        # A flooding sender must not flood the log either: WARNING once a minute.
        now = time.monotonic()
        if now - self._last_drop_log >= 60.0:
            self._last_drop_log = now
            log.warning(msg, *args)
        else:
            log.debug(msg, *args)
