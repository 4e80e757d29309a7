"""One way to serve a request: admit it, run the handler, answer with its result or one error.

Every coordinator request handler goes through ``guarded``. First the bus's
``RequestGuard`` admits the request, in this one place for every type: the sender must be
a live (not revoked) principal whose role may send that type
(``broker.request_roles.COORDINATOR_INBOX``; a type missing there is refused to everyone),
and the sender's token bucket for that kind of request must not be empty (``rate_limited``
otherwise). Then the handler runs; a given domain error maps to the same wire code
everywhere (each error class declares its ``code``; docs/protocol.md lists them) and
nothing a client sends can escape as an exception into a bus lane.

The guard caches principal lookups for ``PRINCIPAL_TTL_S`` at most; the coordinator's
own revoke, rotate and replace forget the entry at once (``RequestGuard.forget``), so a
revoke through ``xcloud admin`` refuses the very next request of that principal. A revoke
written straight into the database (``xcloud admin --db``) is seen within the TTL.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from broker.acl import Role
from broker.bus import Bus, Incoming
from broker.config import CoordinatorConfig
from broker.rate_limit import TokenBuckets
from broker.request_roles import COORDINATOR_INBOX, Limit, RequestRule
from coordinator.errors import CoordinatorError, StoreError
from coordinator.monitoring.instruments import instrumented
from coordinator.store import Store
from schemas.messages import Body

log = logging.getLogger(__name__)

Handler = Callable[[Incoming], Body | None]
"""Returns the reply, or None when it replies itself later (``exec.report``)."""

PRINCIPAL_TTL_S = 1.0  # how long a principal's role and revocation are cached
PRINCIPAL_CACHE_MAX = 4096


class Refusal(CoordinatorError):
    """A request the rules refuse; ``code`` is the wire error code (docs/protocol.md)."""

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


class RequestGuard:
    """Admits requests to the coordinator's inbox (see the module docstring)."""

    def __init__(self, store: Store, config: CoordinatorConfig, *,
                 table: Mapping[str, RequestRule] = COORDINATOR_INBOX,
                 clock: Callable[[], float] = time.monotonic,
                 principal_ttl_s: float = PRINCIPAL_TTL_S,
                 anonymous_role: Role | None = None) -> None:
        """``anonymous_role``: the role of senders the store does not know (the broker's
        anonymous mode admits them as clients); None refuses them."""
        self.store = store
        self.table = table
        self.anonymous_role = anonymous_role
        self._clock = clock
        self._ttl = principal_ttl_s
        self._roles: dict[str, tuple[Role, float]] = {}  # live principal -> (role, looked up at)
        self._lock = threading.Lock()
        self.buckets: dict[Limit, TokenBuckets] = {
            Limit.REQUESTS: TokenBuckets(config.rate_limit_per_s, config.rate_limit_burst,
                                         clock=clock),
            Limit.REPORTS: TokenBuckets(config.report_rate_per_s, config.report_burst,
                                        clock=clock),
        }

    def install(self, bus: Bus) -> None:
        """Make this the guard of every ``guarded`` handler on ``bus``."""
        _GUARDS[bus] = self

    # -- principals ---------------------------------------------------------------------

    def role_of(self, principal: str) -> Role | None:
        """The live principal's role; None when unknown or revoked (cached briefly)."""
        now = self._clock()
        with self._lock:
            cached = self._roles.get(principal)
        if cached is not None and now - cached[1] < self._ttl:
            return cached[0]
        record = self.store.get_principal(principal)
        if record is None:
            return self.anonymous_role
        role: Role | None = None
        if not record.revoked:
            try:
                role = Role(record.role)
            except ValueError:
                log.error("principal %s has an unknown role %r", principal, record.role)
        if role is not None:  # unknown and revoked ones are looked up every time
            with self._lock:
                if len(self._roles) >= PRINCIPAL_CACHE_MAX:
                    self._roles.clear()
                self._roles[principal] = (role, now)
        return role

    def forget(self, principal: str) -> None:
        """Drop the cached role of ``principal`` (after a revoke, rotation or replace)."""
        with self._lock:
            self._roles.pop(principal, None)

    # -- admission ----------------------------------------------------------------------

    def admit(self, incoming: Incoming) -> None:
        """Raise ``Refusal`` (``forbidden`` or ``rate_limited``) unless ``incoming`` may be
        served now; a granted request has taken its token."""
        sender = incoming.sender or ""
        mtype = incoming.message.type
        rule = self.table.get(mtype)
        if rule is None:
            log.error("refused %s from %s: the type has no row in the request table",
                      mtype, sender)
            raise Refusal("forbidden", f"no principal may send {mtype} to the coordinator")
        role = self.role_of(sender)
        if role is None:
            raise Refusal("forbidden", f"principal {sender} is unknown or revoked")
        if not rule.allows(role):
            raise Refusal("forbidden", _not_allowed(sender, role, mtype, rule),
                          {"role": role.value})
        if rule.limit is Limit.NONE:
            return
        buckets = self.buckets[rule.limit]
        wait = buckets.take(sender)
        if wait > 0:
            raise Refusal(
                "rate_limited",
                f"{sender} sends requests too fast: at most {buckets.rate:g} {rule.limit} "
                f"per second (bursts of {buckets.burst}); {mtype} refused, retry in "
                f"{wait:.2g}s", {"retry_after_s": round(wait, 3)})


def _not_allowed(sender: str, role: Role, mtype: str, rule: RequestRule) -> str:
    if rule.roles == {Role.ADMIN}:
        return f"{sender} is not an admin: only admins may send {mtype}"
    may = " or ".join(sorted(r.value for r in rule.roles)) or "no"
    return f"{sender} is a {role.value} principal: {mtype} is for {may} principals only"


_GUARDS: weakref.WeakKeyDictionary[Bus, RequestGuard] = weakref.WeakKeyDictionary()


def admit(bus: Bus, incoming: Incoming) -> None:
    """The guard's admission for ``bus``; refuses everything when it has no guard."""
    guard = _GUARDS.get(bus)
    if guard is None:
        log.error("no request guard on this bus: refused %s", incoming.message.type)
        raise Refusal("unavailable", "the coordinator is not ready to serve requests")
    guard.admit(incoming)


def screened(bus: Bus, incoming: Incoming) -> bool:
    """Admit ``incoming``; on refusal answer it with the error and return False."""
    if incoming.sender is None:
        return False
    try:
        admit(bus, incoming)
    except CoordinatorError as err:
        if isinstance(err, StoreError):
            log.error("%s from %s: %s", incoming.message.type, incoming.sender, err)
        bus.reply_error(incoming, err.code, err.wire_message(), err.detail)
        return False
    return True


def guarded(bus: Bus, fn: Handler, *, admitted: bool = False) -> Callable[[Incoming], None]:
    """``fn`` as a bus handler that admits the request and sends exactly one reply.

    ``admitted``: the caller already ran ``admit`` (``reserve`` admits on its lane, then
    runs on a pool). When ``fn`` returns None it has taken over the reply.
    """

    def run(incoming: Incoming) -> None:
        if incoming.sender is None:
            return
        try:
            if not admitted:
                admit(bus, incoming)
            reply = fn(incoming)
        except CoordinatorError as err:
            if isinstance(err, StoreError):
                log.error("%s from %s: %s", incoming.message.type, incoming.sender, err)
            bus.reply_error(incoming, err.code, err.wire_message(), err.detail)
        except Exception:
            log.exception("%s from %s failed", incoming.message.type, incoming.sender)
            bus.reply_error(incoming, "internal", "the coordinator failed to serve this request")
        else:
            if reply is not None:
                bus.reply(incoming, reply)

    return instrumented(run)  # request latency for /metrics (docs/monitoring.md)
