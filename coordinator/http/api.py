"""The dashboard's JSON API (``/api/...``); every route but login needs an identity.

What each role sees: everybody logged in sees the grid (workers, their metrics and
history, grid-wide series); a client sees its own reservations, jobs and audit records and,
in the workers table, only *that* a worker is reserved unless it holds it; an admin sees
everything and may drain or resume a worker (the same rule as ``workers.drain``).
Store calls run on the server's thread pool, never on its event loop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from broker.bus import Bus
from broker.config import MonitoringConfig
from coordinator import wire
from coordinator.errors import CoordinatorError, NotFound
from coordinator.http import jobs_views, views
from coordinator.http.auth import (
    COOKIE,
    Authenticator,
    Identity,
    LoginLimiter,
    Sessions,
)
from coordinator.monitoring.grid_series import SERIES
from coordinator.monitoring.job_queries import jobs_page
from coordinator.monitoring.service import MonitoringService
from coordinator.monitoring.tiers import GRID_RES, MAX_POINTS, pick_resolution
from coordinator.reservation_state import LIVE_STATES
from coordinator.store import Store

log = logging.getLogger(__name__)

RANGES = (900, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400)
MAX_RANGE_S = 400 * 86400
RAW_POINTS_MAX = 10_000
EVENTS_SHOWN = 200
LIST_MAX = 500
BODY_MAX = 4096
COMPRESS_OVER = 2048  # bytes of JSON worth compressing
ID_SHOWN_MAX = 128  # longer "ids" are not ids: refused before any query

Blocking = Callable[..., Awaitable[Any]]
Drain = Callable[[str, str, bool], dict[str, Any]]


@dataclass
class DashboardContext:
    """What the API reads and may do; built by the coordinator."""

    store: Store
    config: MonitoringConfig
    monitoring: MonitoringService
    drain: Drain  # (principal, worker, drain?) -> detail, through workers.drain's rule
    flush_audit: Callable[[], None]
    grid: str  # the topic root, shown in the page title
    coordinator: str
    version: str
    object_path: Callable[[str], Path] | None = None  # a data object's file (previews)
    bus: Bus | None = None  # the coordinator's bus: relays running jobs' output (job_output)


def json_response(data: Any, status: int = 200) -> web.Response:
    text = json.dumps(data, separators=(",", ":"), allow_nan=False, default=str)
    response = web.Response(text=text, status=status, content_type="application/json")
    response.headers["Cache-Control"] = "no-store"
    if len(text) > COMPRESS_OVER:
        response.enable_compression()  # gzip when the client accepts it
    return response


def error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


_CODES = {"forbidden": 403, "not_found": 404, "invalid": 400, "conflict": 409,
          "rate_limited": 429}


IDENTITY = web.RequestKey("identity", Identity)


def identity_of(request: web.Request) -> Identity:
    return request[IDENTITY]


class DashboardAPI:
    """Route handlers; ``routes()`` lists them for the server."""

    def __init__(self, ctx: DashboardContext, sessions: Sessions, auth: Authenticator,
                 blocking: Blocking, clock: Callable[[], float] = time.time) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.auth = auth
        self.limiter = LoginLimiter()
        self.blocking = blocking
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/api/login", self.login),
            web.post("/api/logout", self.logout),
            web.get("/api/me", self.me),
            web.get("/api/overview", self.overview),
            web.get("/api/grid/series", self.grid_series),
            web.get("/api/workers", self.workers),
            web.get("/api/workers/{wid}", self.worker),
            web.get("/api/workers/{wid}/series", self.worker_series),
            web.post("/api/workers/{wid}/drain", self.drain),
            web.get("/api/reservations", self.reservations),
            web.get("/api/audit", self.audit),
            web.get("/api/jobs", self.jobs),
            web.get("/api/jobs/{jid}", self.job),
        ]

    # ---- session

    async def login(self, request: web.Request) -> web.StreamResponse:
        address = request.remote or "?"
        if self.limiter.blocked(address):
            return error(429, "too many failed logins; wait a minute")
        body = await _json_body(request)
        if body is None:
            return error(400, "send JSON: {\"principal\": ..., \"token\": ...}")
        principal, token = body.get("principal"), body.get("token")
        role = await self.blocking(self.auth.login, principal, token)
        if role is None or not isinstance(principal, str):
            self.limiter.failed(address)
            log.info("dashboard login refused for %r from %s", str(principal)[:64], address)
            return error(401, "unknown principal or wrong token (or not an admin or client)")
        session = self.sessions.create(principal, role)
        log.info("dashboard login: %s (%s) from %s", principal, role, address)
        response = json_response(self._me(Identity(principal, role, session)))
        response.set_cookie(COOKIE, session.sid, httponly=True, samesite="Strict", path="/",
                            max_age=int(self.sessions.ttl_s),
                            secure=request.secure)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        who = identity_of(request)
        if who.session is not None:
            self.sessions.drop(who.session.sid)
        response = json_response({"ok": True})
        response.del_cookie(COOKIE, path="/")
        return response

    async def me(self, request: web.Request) -> web.StreamResponse:
        return json_response(self._me(identity_of(request)))

    def _me(self, who: Identity) -> dict[str, Any]:
        return {"principal": who.principal, "role": who.role,
                "csrf": who.session.csrf if who.session else None,
                "grid": self.ctx.grid, "coordinator": self.ctx.coordinator,
                "version": self.ctx.version, "series": SERIES, "ranges": RANGES,
                "live_tick_s": self.ctx.config.live_tick_s}

    # ---- the grid

    async def overview(self, _request: web.Request) -> web.StreamResponse:
        def read() -> dict[str, Any]:
            now = self._clock()
            snapshot = self.ctx.monitoring.sampler.snapshot()
            rows = self.ctx.store.grid_buckets(GRID_RES, now - 3600, now + GRID_RES, SERIES,
                                               len(SERIES) * 400)
            return {"now": now, "grid": snapshot,
                    "series": views.grid_series(rows, SERIES), "res": GRID_RES}

        return json_response(await self.blocking(read))

    async def grid_series(self, request: web.Request) -> web.StreamResponse:
        span = _range(request)
        if span is None:
            return error(400, f"range must be seconds between 60 and {MAX_RANGE_S}")
        mon = self.ctx.monitoring
        res = pick_resolution(span, mon.config.raw_retention_s, mon.tiers) or GRID_RES

        def read() -> dict[str, Any]:
            now = self._clock()
            rows = self.ctx.store.grid_buckets(res, now - span, now + res, SERIES,
                                               len(SERIES) * (MAX_POINTS + 10))
            return {"res": res, "range": span, **views.grid_series(rows, SERIES)}

        return json_response(await self.blocking(read))

    async def workers(self, request: web.Request) -> web.StreamResponse:
        who = identity_of(request)

        def read() -> list[dict[str, Any]]:
            store = self.ctx.store
            records = store.list_workers()
            held = {r.worker_id: r for r in store.list_reservations(states=LIVE_STATES)}
            running = self.ctx.monitoring.running
            return [views.worker_row(r, views.holder_of(held.get(r.id), who.principal,
                                                        who.is_admin), running.execs(r.id))
                    for r in records]

        return json_response({"workers": await self.blocking(read), "now": self._clock()})

    async def worker(self, request: web.Request) -> web.StreamResponse:
        who = identity_of(request)
        wid = request.match_info["wid"]

        def read() -> dict[str, Any] | None:
            store = self.ctx.store
            record = store.get_worker(wid)
            if record is None:
                return None
            events = store.worker_events(record.id, EVENTS_SHOWN)
            held = store.reservation_of_worker(record.id)
            return views.worker_detail(record, events,
                                       views.holder_of(held, who.principal, who.is_admin),
                                       self.ctx.monitoring.running.execs(record.id))

        detail = await self.blocking(read)
        if detail is None:
            return error(404, f"no worker {wid[:128]!r}")
        return json_response(detail)

    async def worker_series(self, request: web.Request) -> web.StreamResponse:
        wid = request.match_info["wid"]
        span = _range(request)
        if span is None:
            return error(400, f"range must be seconds between 60 and {MAX_RANGE_S}")
        mon = self.ctx.monitoring
        res = pick_resolution(span, mon.config.raw_retention_s, mon.tiers)

        def read() -> dict[str, Any] | None:
            store = self.ctx.store
            record = store.get_worker(wid)
            if record is None:
                return None
            now = self._clock()
            if res == 0:
                rows = store.raw_series(record.id, now - span, now + 1, RAW_POINTS_MAX)
                series = views.raw_series(rows, record.heartbeat_interval)
            else:
                rows = store.worker_buckets(record.id, res, now - span, now + res,
                                            MAX_POINTS + 10)
                series = views.bucket_series(rows, res)
            return {"worker": record.id, "res": res, "range": span, "now": now, **series}

        data = await self.blocking(read)
        if data is None:
            return error(404, f"no worker {wid[:128]!r}")
        return json_response(data)

    async def drain(self, request: web.Request) -> web.StreamResponse:
        who = identity_of(request)
        if not who.is_admin:
            return error(403, "only admins may drain workers")
        body = await _json_body(request)
        drain = True if body is None else body.get("drain", True)
        if not isinstance(drain, bool):
            return error(400, "drain must be true or false")
        wid = request.match_info["wid"]
        try:
            detail = await self.blocking(self.ctx.drain, who.principal, wid, drain)
        except NotFound as err:
            return error(404, str(err))
        except CoordinatorError as err:
            return error(_CODES.get(getattr(err, "code", ""), 500), err.wire_message())
        log.info("dashboard: %s %s worker %s", who.principal,
                 "drained" if drain else "resumed", wid)
        return json_response(detail)

    # ---- reservations and the audit trail

    async def reservations(self, request: web.Request) -> web.StreamResponse:
        who = identity_of(request)
        active = request.query.get("active", "1") != "0"
        mine_only = not who.is_admin or request.query.get("mine") == "1"

        def read() -> list[dict[str, Any]]:
            store = self.ctx.store
            records = store.list_reservations(
                client_id=who.principal if mine_only else None,
                states=LIVE_STATES if active else None, limit=LIST_MAX)
            names = store.worker_names(r.worker_id for r in records)
            return [views.reservation_row(r, names.get(r.worker_id)) for r in records]

        return json_response({"reservations": await self.blocking(read),
                              "all": not mine_only, "now": self._clock()})

    async def audit(self, request: web.Request) -> web.StreamResponse:
        who = identity_of(request)
        worker = request.query.get("worker") or None
        client = request.query.get("client") or None
        if not who.is_admin:
            if client not in (None, who.principal):
                return error(403, "only admins may read other principals' audit records")
            client = who.principal
        try:
            limit = max(1, min(LIST_MAX, int(request.query.get("limit", "100"))))
        except ValueError:
            return error(400, "limit must be a whole number")

        def read() -> list[dict[str, Any]]:
            self.ctx.flush_audit()
            records = self.ctx.store.list_exec_audit(client_id=client, worker_id=worker,
                                                     limit=limit)
            return [wire.audit_entry(r) for r in records]

        return json_response({"records": await self.blocking(read), "now": self._clock()})

    # ---- batch jobs (same audience rule as reservations)

    async def jobs(self, request: web.Request) -> web.StreamResponse:
        who = identity_of(request)
        mine_only = not who.is_admin or request.query.get("mine") == "1"
        try:
            states = jobs_views.parse_states(request.query.get("state"))
        except ValueError as err:
            return error(400, str(err))
        try:
            limit = max(1, min(LIST_MAX, int(request.query.get("limit", "100"))))
        except ValueError:
            return error(400, "limit must be a whole number")
        before = request.query.get("before") or None
        if before is not None and len(before) > ID_SHOWN_MAX:
            return error(400, "before must be a job id")

        def read() -> dict[str, Any]:
            store = self.ctx.store
            records, more = jobs_page(store, owner=who.principal if mine_only else None,
                                      states=states, before=before, limit=limit)
            names = store.worker_names(r.worker for r in records if r.worker)
            return {"jobs": [jobs_views.job_row(r, names) for r in records], "more": more}

        data = await self.blocking(read)
        return json_response({**data, "all": not mine_only, "now": self._clock()})

    async def job(self, request: web.Request) -> web.StreamResponse:
        who = identity_of(request)
        jid = request.match_info["jid"]
        if len(jid) > ID_SHOWN_MAX:
            return error(404, "no such job")

        def read() -> dict[str, Any] | None:
            store = self.ctx.store
            record = store.get_job(jid)
            if record is None or (record.owner != who.principal and not who.is_admin):
                return None  # somebody else's job: nothing tells it exists
            attempts, older = store.job_attempts(record.id)
            result = store.job_result(record.id) if record.state.terminal else None
            names = store.worker_names([a.worker_id for a in attempts])
            return jobs_views.job_detail(record, attempts, older, result, names,
                                         self.ctx.object_path)

        detail = await self.blocking(read)
        if detail is None:
            return error(404, f"no job {jid!r}")
        return json_response(detail)


def _range(request: web.Request) -> int | None:
    try:
        span = int(request.query.get("range", "3600"))
    except ValueError:
        return None
    return span if 60 <= span <= MAX_RANGE_S else None


async def _json_body(request: web.Request) -> dict[str, Any] | None:
    if request.content_length is not None and request.content_length > BODY_MAX:
        return None
    try:
        raw = await request.content.read(BODY_MAX + 1)
        if len(raw) > BODY_MAX:
            return None
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None
