"""DashboardServer: the coordinator's HTTP listener (dashboard, JSON API, SSE, /metrics).

aiohttp runs on its own event loop in its own thread, so nothing here touches the bus's
lanes; database reads go to a small thread pool. ``start`` returns once the socket
listens (``url`` then holds the real port when the configured one is 0); ``stop`` closes
every stream and joins every thread.

Routes: ``/`` and ``/static/...`` (the page and its files: public, they hold no data),
``/api/...`` (``coordinator.http.api``; a session or a bearer token), ``/api/events``
(server-sent events, ``coordinator.http.live``), ``/api/jobs/ID/output`` (a running
job's output, relayed from its worker: ``coordinator.http.job_output``) and
``/metrics`` (Prometheus; a token unless ``[monitoring] metrics_public``). The listener
binds 127.0.0.1 unless configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import hashlib
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coordinator.errors import CoordinatorError
from coordinator.http.api import (
    ID_SHOWN_MAX,
    IDENTITY,
    DashboardAPI,
    DashboardContext,
    error,
    identity_of,
)
from coordinator.http.auth import (
    COOKIE,
    CSRF_HEADER,
    Authenticator,
    Identity,
    Sessions,
    csrf_ok,
)
from coordinator.http.job_output import JobOutputRelay
from coordinator.http.live import LiveFeed

log = logging.getLogger(__name__)

STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
                ".txt": "text/plain", ".LICENSE": "text/plain"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
KEEPALIVE_S = 15.0
RECHECK_STREAM_S = 5.0
DB_THREADS = 4


class DashboardError(CoordinatorError):
    """The dashboard cannot start (port taken, bad address, ...)."""


class StaticFiles:
    """The page's files, read once from the package (and gzipped once)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, bytes, str, str]] = {}
        root = resources.files("coordinator.http").joinpath("static")
        self._load(root, "")

    def _load(self, folder: Any, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                self._load(entry, f"{prefix}{entry.name}/")
                continue
            suffix = "." + entry.name.rsplit(".", 1)[-1]
            kind = STATIC_TYPES.get(suffix)
            if kind is None:
                continue
            data = entry.read_bytes()
            etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'
            self.files[prefix + entry.name] = (data, gzip.compress(data, 9), kind, etag)

    def response(self, request: web.Request, name: str) -> web.StreamResponse:
        found = self.files.get(name)
        if found is None:
            raise web.HTTPNotFound()
        data, zipped, kind, etag = found
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        charset = "utf-8"
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            headers["Content-Encoding"] = "gzip"
            data = zipped
        headers["Vary"] = "Accept-Encoding"
        return web.Response(body=data, content_type=kind, charset=charset, headers=headers)


class DashboardServer:
    """See the module docstring."""

    def __init__(self, ctx: DashboardContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.sessions = Sessions(ctx.config.session_ttl_s)
        self.auth = Authenticator(ctx.store)
        self.static = StaticFiles()
        self.feed = LiveFeed(ctx.store, ctx.monitoring.sampler, ctx.monitoring.running,
                             ctx.config.live_tick_s)
        self.api = DashboardAPI(ctx, self.sessions, self.auth, self._blocking)
        # a running job's live output, relayed from its worker (None: no bus given)
        self.job_output = (JobOutputRelay(ctx.bus, ctx.store, self._blocking)
                           if ctx.bus is not None else None)
        self.port = 0
        self._pool: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._feed_task: asyncio.Task[None] | None = None
        self._streams: set[web.StreamResponse] = set()
        self._closing = False

    @property
    def url(self) -> str:
        host = self.config.http_host
        shown = f"[{host}]" if ":" in host else host
        if host in ("0.0.0.0", "::"):
            shown = "127.0.0.1"
        return f"http://{shown}:{self.port}/"

    # ---- lifecycle

    def start(self) -> None:
        """Listen on ``http_host:http_port``; returns once the socket is bound."""
        self._pool = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="dashboard-db")
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._listen())
        except OSError as err:
            loop.run_until_complete(self._shutdown())
            loop.close()
            self._pool.shutdown(wait=True)
            raise DashboardError(
                f"cannot serve the dashboard on {self.config.http_host}:"
                f"{self.config.http_port}: {err.strerror or err}; choose another port with "
                "--http PORT (0 = any free port)") from None
        self._thread = threading.Thread(target=self._serve, name="dashboard-http",
                                        daemon=True)
        self._thread.start()
        log.info("dashboard on %s", self.url)

    async def _listen(self) -> None:
        app = web.Application(middlewares=[self._headers, self._authenticate],
                              client_max_size=64 * 1024)
        app.add_routes([web.get("/", self._index), web.get("/static/{name:.+}", self._file),
                        web.get("/api/events", self._events), web.get("/metrics", self._metrics),
                        web.get("/api/jobs/{jid}/output", self._job_output),
                        *self.api.routes()])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.http_host, self.config.http_port,
                           reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.config.http_port
        self._feed_task = asyncio.get_running_loop().create_task(self.feed.run(self._blocking))
        if self.job_output is not None:
            self.job_output.start(asyncio.get_running_loop())

    def _serve(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        self._closing = True
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            future.result(15)
        except Exception:
            log.exception("dashboard did not stop cleanly")
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(15)
        loop.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    async def _shutdown(self) -> None:
        if self._feed_task is not None:
            self._feed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feed_task
        for queue in list(self.feed.subscribers):
            queue.put_nowait(None) if not queue.full() else None
        self.feed.subscribers.clear()
        if self.job_output is not None:
            await self.job_output.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    # ---- middlewares

    @web.middleware
    async def _headers(self, request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if isinstance(response, web.HTTPException):
            raise response
        return response

    @web.middleware
    async def _authenticate(self, request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
        path = request.path
        protected = path.startswith("/api/") or (
            path == "/metrics" and not self.config.metrics_public)
        if not protected:
            return await handler(request)
        origin = request.headers.get("Origin")
        if origin is not None and origin != _own_origin(request):
            return error(403, "cross-origin requests are refused")
        if path == "/api/login":
            if request.content_type != "application/json":
                return error(415, "send the login as application/json")
            return await handler(request)
        who = await self._identify(request)
        if who is None:
            response = error(401, "log in first (or send Authorization: Bearer "
                                  "<principal>:<token>)")
            if path == "/metrics":
                response.headers["WWW-Authenticate"] = 'Basic realm="xcloud"'
            return response
        if request.method not in ("GET", "HEAD") and who.session is not None and not csrf_ok(
                who.session, request.headers.get(CSRF_HEADER)):
            return error(403, f"missing or wrong {CSRF_HEADER} header")
        request[IDENTITY] = who
        return await handler(request)

    async def _identify(self, request: web.Request) -> Identity | None:
        header = request.headers.get("Authorization")
        if header:
            found: Identity | None = await self._blocking(self.auth.from_header, header)
            return found
        session = self.sessions.get(request.cookies.get(COOKIE, ""))
        if session is None:
            return None
        role = await self._blocking(self.auth.current_role, session.principal)
        if role is None:  # revoked (or demoted) since the login
            self.sessions.drop_principal(session.principal)
            return None
        return Identity(session.principal, role, session)

    # ---- routes outside the API

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return self.static.response(request, "index.html")

    async def _file(self, request: web.Request) -> web.StreamResponse:
        return self.static.response(request, request.match_info["name"])

    async def _metrics(self, _request: web.Request) -> web.StreamResponse:
        registry = self.ctx.monitoring.registry
        body = await self._blocking(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST,
                                                "Cache-Control": "no-store"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        who = identity_of(request)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue = self.feed.subscribe()
        self._streams.add(response)
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            await response.write(b"retry: 2000\n\nevent: hello\ndata: {}\n\n")
            while not self._closing:
                try:
                    message = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    message = ""
                if message is None:
                    break
                if loop.time() - checked > RECHECK_STREAM_S:
                    checked = loop.time()
                    if not await self._still_allowed(who):
                        await response.write(b"event: logout\ndata: {}\n\n")
                        break
                if message:
                    await response.write(b"event: tick\ndata: " + message.encode() + b"\n\n")
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self.feed.unsubscribe(queue)
            self._streams.discard(response)
        return response

    async def _job_output(self, request: web.Request) -> web.StreamResponse:
        who = identity_of(request)
        jid = request.match_info["jid"]
        if self.job_output is None or len(jid) > ID_SHOWN_MAX:
            return error(404, f"no live output for job {jid[:ID_SHOWN_MAX]!r}")
        return await self.job_output.stream(request, who.principal, who.is_admin, jid)

    async def _still_allowed(self, who: Identity) -> bool:
        if who.session is not None and self.sessions.get(who.session.sid) is None:
            return False
        role = await self._blocking(self.auth.current_role, who.principal)
        return role is not None


def _own_origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"
