"""A running job's live output on its dashboard page (``GET /api/jobs/ID/output``, SSE).

The coordinator relays: for a viewer allowed to see the job (its owner or an admin; any
other principal gets 404, as on the other job routes) it sends ``job.follow`` for the job's
current attempt to the worker running it, from the coordinator's own bus (the worker lets
the coordinator principal follow any attempt; worker/job_follow.py), and streams the
``job.output`` pieces to the page as server-sent events (the transport of
``/api/events``, coordinator/http/live.py), from offset 0, then an ``end`` event with the
outcome when the attempt ends.

Bounded, never amplified: one follow per job shared by every viewer of that job (at most
``MAX_VIEWERS`` of them), at most ``MAX_RELAYS`` jobs followed at once; each relay keeps
the last ``KEEP_CHARS`` of each stream (a new viewer gets that, then what comes). The
relay stops when its last viewer leaves and tells the worker so (``job.follow`` with
``stop``; failing that, the worker's follow of the coordinator ends within its short
``follow_s``: worker/job_follow.py). A worker that goes silent is
looked at in the store every ``QUIET_S``: a lost worker or an ended attempt ends the
stream with a line saying so. ``job.output`` arrives on the bus's inbox lane and is
handed to the server's event loop; nothing here runs on the MQTT network thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from broker.bus import Bus, BusError, Incoming, Lane
from coordinator.store import Store
from schemas.job_messages import JobFollow, JobOutput
from schemas.messages import Error

log = logging.getLogger(__name__)

KEEP_CHARS = 256 * 1024  # per stream, what a relay (and a page) holds
MAX_VIEWERS = 16  # pages open on one job's output
MAX_RELAYS = 32  # jobs followed at once by this coordinator
QUEUE_MAX = 256  # events a page may be behind before it is dropped (it reconnects)
QUIET_S = 5.0  # without output this long, look at the job in the store
REQUEST_TIMEOUT_S = 10.0
RETRIES = 5  # job.follow answered not_found (the attempt is just being assigned) or nothing
RETRY_S = 1.0
KEEPALIVE_S = 15.0
STREAMS = ("stdout", "stderr")
LIVE_KINDS = frozenset({"assigned", "running"})

Blocking = Callable[..., Awaitable[Any]]


@dataclass
class _Relay:
    job: str
    attempt: str
    worker: str
    follow: str = ""
    offsets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    text: dict[str, str] = field(default_factory=lambda: dict.fromkeys(STREAMS, ""))
    decoders: dict[str, Any] = field(default_factory=lambda: {
        s: codecs.getincrementaldecoder("utf-8")("replace") for s in STREAMS})
    viewers: set[asyncio.Queue[str | None]] = field(default_factory=set)
    eof: asyncio.Queue[JobOutput] = field(default_factory=asyncio.Queue)
    ended: str | None = None  # the ``end`` event's data once sent
    task: asyncio.Task[None] | None = None


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class JobOutputRelay:
    """The coordinator's relays of running jobs' output to dashboard pages."""

    def __init__(self, bus: Bus, store: Store, blocking: Blocking) -> None:
        self.bus = bus
        self.store = store
        self.blocking = blocking
        self.relays: dict[str, _Relay] = {}  # job -> relay (loop thread only)
        self._by_follow: dict[str, _Relay] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.bus.on_inbox(JobOutput.TYPE, self._on_output, lane=Lane.INBOX)

    async def close(self) -> None:
        for relay in list(self.relays.values()):
            self._finish(relay, {"line": "the coordinator's dashboard is stopping"})

    # -- the bus side (inbox lane): hand over to the loop -------------------------------

    def _on_output(self, incoming: Incoming) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(self._take, incoming.sender or "", incoming.body)

    def _take(self, sender: str, body: JobOutput) -> None:
        relay = self._by_follow.get(body.follow)
        if relay is None or sender != relay.worker or relay.ended is not None:
            return  # an ended follow's tail, or not from the worker we asked
        try:
            data = base64.b64decode(body.data, validate=True)
        except (binascii.Error, ValueError):
            data = b""
        skip = max(0, relay.offsets[body.stream] - body.offset)
        if len(data) > skip:
            relay.offsets[body.stream] = body.offset + len(data)
            text = relay.decoders[body.stream].decode(data[skip:])
            if text:
                kept = relay.text[body.stream] + text
                relay.text[body.stream] = kept[-KEEP_CHARS:]
                self._publish(relay, _event("output", {"stream": body.stream, "text": text}))
        if body.eof:
            relay.eof.put_nowait(body)

    def _publish(self, relay: _Relay, message: str | None) -> None:
        for queue in list(relay.viewers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                log.info("a page fell behind job %s's output; dropping it", relay.job)
                relay.viewers.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    # -- the route ----------------------------------------------------------------------

    def _lookup(self, jid: str, principal: str, admin: bool) -> dict[str, Any] | None:
        record = self.store.get_job(jid)
        if record is None or (record.owner != principal and not admin):
            return None
        attempts, _ = self.store.job_attempts(record.id, 5)
        for attempt in attempts:
            if attempt.kind.value in LIVE_KINDS and attempt.id == record.current_attempt:
                return {"state": record.state.value, "attempt": attempt.id,
                        "worker": attempt.worker_id}
        return {"state": record.state.value, "attempt": None, "worker": None}

    async def stream(self, request: web.Request, principal: str, admin: bool,
                     jid: str) -> web.StreamResponse:
        found = await self.blocking(self._lookup, jid, principal, admin)
        if found is None:
            return web.json_response({"error": f"no job {jid!r}"}, status=404)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUE_MAX)
        relay: _Relay | None = None
        try:
            await response.write(b"retry: 3000\n\n")
            if found["attempt"] is None:
                await response.write(_event("end", {
                    "state": found["state"],
                    "line": f"job {jid} is {found['state']}: not running now"}).encode())
                return response
            relay, refusal = self._join(jid, found["attempt"], found["worker"], queue)
            if relay is None:
                await response.write(_event("end", {"line": refusal}).encode())
                return response
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if message is None:
                    break
                await response.write(message.encode())
                if message.startswith("event: end"):
                    break
        except ConnectionResetError:
            pass  # the page went away
        finally:
            if relay is not None:
                self._leave(relay, queue)
        return response

    def _join(self, jid: str, attempt: str, worker: str, queue: asyncio.Queue[str | None]
              ) -> tuple[_Relay | None, str]:
        relay = self.relays.get(jid)
        if relay is not None and relay.attempt != attempt:
            self._finish(relay, {"line": f"attempt {relay.attempt} ended; a new one runs"})
            relay = None
        if relay is None:
            if len(self.relays) >= MAX_RELAYS:
                return None, (f"the coordinator already relays {MAX_RELAYS} jobs' output; "
                              "reload the page later (the output is kept with the result)")
            relay = _Relay(job=jid, attempt=attempt, worker=worker)
            self.relays[jid] = relay
            relay.task = asyncio.get_running_loop().create_task(self._follow(relay))
        if len(relay.viewers) >= MAX_VIEWERS:
            return None, (f"job {jid}'s output already has {MAX_VIEWERS} viewers; reload "
                          "the page later")
        relay.viewers.add(queue)
        queue.put_nowait(_event("snapshot", {"attempt": attempt, "worker": worker,
                                             "stdout": relay.text["stdout"],
                                             "stderr": relay.text["stderr"]}))
        if relay.ended is not None:
            queue.put_nowait(relay.ended)
        return relay, ""

    def _leave(self, relay: _Relay, queue: asyncio.Queue[str | None]) -> None:
        relay.viewers.discard(queue)
        if not relay.viewers:  # the last viewer left: stop following
            if relay.ended is None and relay.follow:
                self._stop_follow(relay)
            self._finish(relay, None)

    def _stop_follow(self, relay: _Relay) -> None:
        """Tell the worker at once (``job.follow`` stop), rather than let its follow of
        us run out its ``follow_s``: nobody reads what it would send."""
        try:
            self.bus.send(self.bus.topics.worker_inbox(relay.worker),
                          JobFollow(attempt=relay.attempt, follow=relay.follow, stop=True))
        except BusError as err:
            log.debug("could not stop the follow of job %s: %s", relay.job, err)

    def _finish(self, relay: _Relay, end: dict[str, Any] | None) -> None:
        if end is not None and relay.ended is None:
            relay.ended = _event("end", end)
            self._publish(relay, relay.ended)
        if self.relays.get(relay.job) is relay:
            del self.relays[relay.job]
        self._by_follow.pop(relay.follow, None)
        task = relay.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()

    # -- one relay's follow -------------------------------------------------------------

    async def _follow(self, relay: _Relay) -> None:
        try:
            end = await self._follow_until_end(relay)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a relay never takes the dashboard down
            log.warning("relaying job %s's output failed: %s", relay.job, err)
            end = {"line": "the live output stopped (an error on the coordinator); reload"}
        self._finish(relay, end)

    async def _follow_until_end(self, relay: _Relay) -> dict[str, Any]:
        """Ask the worker (again, from the offsets, when its follow ends early) until the
        attempt ends; the ``end`` event's data."""
        refusals = 0
        while True:
            self._by_follow.pop(relay.follow, None)
            relay.follow = uuid.uuid4().hex
            self._by_follow[relay.follow] = relay
            body = JobFollow(attempt=relay.attempt, follow=relay.follow,
                             stdout_offset=relay.offsets["stdout"],
                             stderr_offset=relay.offsets["stderr"])
            try:
                future = self.bus.request_async(self.bus.topics.worker_inbox(relay.worker),
                                                body)
                reply = await asyncio.wait_for(asyncio.wrap_future(future), REQUEST_TIMEOUT_S)
            except (TimeoutError, BusError):
                reply = None
            if reply is None or isinstance(reply.body, Error):
                gone = await self._gone(relay)
                if gone is not None:
                    return gone
                refusals += 1
                if reply is None and refusals >= RETRIES:
                    return {"line": f"worker {relay.worker} does not answer; the live "
                                    "output stops here"}
                if reply is not None and (reply.body.code != "not_found"
                                          or refusals >= RETRIES):
                    return {"line": f"cannot follow the job: {reply.body.message}"}
                await asyncio.sleep(RETRY_S)  # not there yet (just assigned): ask again
                continue
            while True:
                try:
                    last = await asyncio.wait_for(relay.eof.get(), QUIET_S)
                except TimeoutError:
                    gone = await self._gone(relay)
                    if gone is not None:
                        return gone
                    continue
                if last.kind is not None:
                    return {"kind": last.kind, "exit_code": last.exit_code,
                            "line": f"attempt {relay.attempt} ended: {last.kind}"
                                    + (f" (exit {last.exit_code})"
                                       if last.exit_code is not None else "")}
                break  # the worker ended this follow early: ask again from the offsets

    async def _gone(self, relay: _Relay) -> dict[str, Any] | None:
        """The ``end`` data when the attempt no longer runs, or its worker is lost."""
        def look() -> dict[str, Any] | None:
            worker = self.store.get_worker(relay.worker)
            if worker is not None and worker.state.value in ("lost", "offline"):
                return {"lost": True,
                        "line": f"worker {relay.worker} is {worker.state.value}: the live "
                                "output stops here"}
            attempt = self.store.get_attempt(relay.attempt)
            if attempt is not None and not attempt.kind.live:
                return {"kind": attempt.kind.value, "exit_code": attempt.exit_code,
                        "line": f"attempt {relay.attempt} ended: {attempt.kind.value}"}
            return None

        found: dict[str, Any] | None = await self.blocking(look)
        return found
