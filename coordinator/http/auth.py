"""Who is asking: dashboard logins, sessions, bearer tokens, CSRF.

- A person logs in with a principal id and its token (the same pair it uses on the bus),
  checked against the store's token hash; revoked principals, workers and the
  coordinator's own principal are refused. The session lives in this process only
  (a restart logs everybody out) behind an HttpOnly, SameSite=Strict cookie.
- Scripts, the JSON API and Prometheus send ``Authorization: Bearer <principal>:<token>``
  (or HTTP Basic with the same pair): the principal is named because token hashes are
  salted, so a bare token could only be found by trying every principal's hash.
- Every request re-checks that the principal is still live (cached ``RECHECK_S``), so a
  revoke ends its sessions within a second.
- State-changing requests from a browser session carry the session's CSRF token in the
  ``X-XCloud-CSRF`` header and, when the browser sends one, an ``Origin`` equal to ours.
  Bearer requests are not ambient (no cookie), so they need neither.
- Failed logins are limited per client address (``LoginLimiter``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from broker.credentials import verify_token
from coordinator.errors import CoordinatorError
from coordinator.store import Store

DASHBOARD_ROLES = frozenset({"admin", "client"})
COOKIE = "xcloud_session"
CSRF_HEADER = "X-XCloud-CSRF"
RECHECK_S = 1.0
MAX_SESSIONS = 10_000
PRINCIPAL_MAX = 128
TOKEN_MAX = 256
LOGIN_FAILURES = 10  # per address and window
LOGIN_WINDOW_S = 60.0
LIMITER_ADDRESSES = 10_000


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller of the dashboard."""

    principal: str
    role: str
    session: Session | None = None  # None: a bearer or basic request

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    principal: str
    role: str
    csrf: str
    expires_at: float


class Sessions:
    """Live login sessions of this process (bounded: the oldest go first)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def create(self, principal: str, role: str) -> Session:
        session = Session(secrets.token_urlsafe(32), principal, role,
                          secrets.token_urlsafe(24), self._clock() + self.ttl_s)
        with self._lock:
            self._by_id[session.sid] = session
            while len(self._by_id) > MAX_SESSIONS:
                self._by_id.popitem(last=False)
        return session

    def get(self, sid: str) -> Session | None:
        if not sid or len(sid) > 128:
            return None
        with self._lock:
            session = self._by_id.get(sid)
            if session is not None and session.expires_at <= self._clock():
                del self._by_id[sid]
                return None
            return session

    def drop(self, sid: str) -> None:
        with self._lock:
            self._by_id.pop(sid, None)

    def drop_principal(self, principal: str) -> None:
        with self._lock:
            for sid in [s for s, v in self._by_id.items() if v.principal == principal]:
                del self._by_id[sid]

    def __len__(self) -> int:
        return len(self._by_id)


class LoginLimiter:
    """At most ``LOGIN_FAILURES`` failed logins per address per ``LOGIN_WINDOW_S``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def blocked(self, address: str) -> bool:
        now = self._clock()
        with self._lock:
            times = self._failures.get(address)
            while times and now - times[0] > LOGIN_WINDOW_S:
                times.popleft()
            return times is not None and len(times) >= LOGIN_FAILURES

    def failed(self, address: str) -> None:
        with self._lock:
            times = self._failures.setdefault(address, deque(maxlen=LOGIN_FAILURES))
            times.append(self._clock())
            self._failures.move_to_end(address)
            while len(self._failures) > LIMITER_ADDRESSES:
                self._failures.popitem(last=False)


class Authenticator:
    """Checks principal/token pairs and whether a principal is still allowed in."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._live: dict[str, tuple[str | None, float]] = {}  # principal -> (role, at)

    def login(self, principal: str, token: str) -> str | None:
        """The role of ``principal`` if ``token`` is its token and it may use the
        dashboard; None otherwise (never says which part was wrong)."""
        if not _fits(principal, PRINCIPAL_MAX) or not _fits(token, TOKEN_MAX):
            return None
        try:
            found = self.store.principal_hash(principal)
        except CoordinatorError:
            return None
        if found is None or found[0] not in DASHBOARD_ROLES:
            return None
        role, stored = found
        if not verify_token(token, stored):
            return None
        with self._lock:
            self._live[principal] = (role, self._clock())
        return role

    def current_role(self, principal: str) -> str | None:
        """The principal's role while it is live and may use the dashboard (cached)."""
        now = self._clock()
        with self._lock:
            cached = self._live.get(principal)
        if cached is not None and now - cached[1] < RECHECK_S:
            return cached[0]
        try:
            found = self.store.principal_hash(principal)
        except CoordinatorError:
            return None
        role = found[0] if found is not None and found[0] in DASHBOARD_ROLES else None
        with self._lock:
            if len(self._live) > MAX_SESSIONS:
                self._live.clear()
            self._live[principal] = (role, now)
        return role

    def from_header(self, header: str) -> Identity | None:
        """An ``Authorization`` header (Bearer principal:token, or Basic) checked."""
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "basic":
            try:
                value = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
        elif scheme.lower() != "bearer":
            return None
        principal, sep, token = value.partition(":")
        if not sep:
            return None
        role = self.login(principal, token)
        return None if role is None else Identity(principal, role)


def csrf_ok(session: Session, header: str | None) -> bool:
    return header is not None and hmac.compare_digest(session.csrf.encode(), header.encode())


def _fits(value: object, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()
