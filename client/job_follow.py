"""``grid.jobs.follow(job)``: a job's stdout and stderr while it runs (docs/jobs.md,
"Following a running job").

The follower asks the worker running the job's current attempt (``jobs.show`` names both)
with ``job.follow`` and reads the ``job.output`` chunks that worker sends into our inbox
(only chunks from that worker, for this follow's id, are taken). It counts the bytes it
has seen of each stream (their offsets); when the job has ended, it yields the rest from
the stored results, from those offsets on, so nothing is printed twice. A new attempt
(a retry after a failure) is followed from its start. A follow the worker ends early
(its time limit, a stopping worker) is asked again from the offsets.
"""

from __future__ import annotations

import base64
import binascii
import logging
import queue
import threading
import uuid
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from broker.bus import BusError, Lane, RemoteError, RequestTimeout
from client.errors import ClientError
from client.reservation import Refused
from schemas.job_messages import TERMINAL_JOB_STATES, JobFollow, JobOutput

if TYPE_CHECKING:
    from broker.bus import Incoming
    from client.api import Grid
    from client.jobs import JobStore

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the job is looked at while it is not running here
QUIET_S = 5.0  # without output this long, check that the attempt still runs
STREAMS = ("stdout", "stderr")
GONE = frozenset({"not_found"})  # the attempt ended (or never ran) on that worker

Chunk = tuple[str, bytes]


class FollowRouter:
    """Routes ``job.output`` to the follow it belongs to (one per Grid)."""

    def __init__(self, grid: Grid) -> None:
        self._lock = threading.Lock()
        self._follows: dict[str, tuple[str, queue.Queue[JobOutput]]] = {}
        grid.bus.on_inbox(JobOutput.TYPE, self.on_output, lane=Lane.JOBS)

    def open(self, follow: str, worker: str) -> queue.Queue[JobOutput]:
        q: queue.Queue[JobOutput] = queue.Queue()
        with self._lock:
            self._follows[follow] = (worker, q)
        return q

    def close(self, follow: str) -> None:
        with self._lock:
            self._follows.pop(follow, None)

    def on_output(self, incoming: Incoming) -> None:
        body: JobOutput = incoming.body
        with self._lock:
            entry = self._follows.get(body.follow)
        if entry is None or entry[0] != incoming.sender:
            return  # an ended follow's tail, or not from the worker we asked
        entry[1].put(body)


def follow(store: JobStore, router: FollowRouter, job: str, *, poll_s: float = POLL_S,
           quiet_s: float = QUIET_S) -> Generator[Chunk, None, None]:
    """(stream, bytes) of ``job`` as they come, then the stored rest (module docstring)."""
    grid = store.grid
    offsets = dict.fromkeys(STREAMS, 0)
    followed: str | None = None  # the attempt the offsets count
    finished: str | None = None  # an attempt whose eof came (its report is on its way)
    while True:
        reply = store.show(job)
        if reply.job["state"] in TERMINAL_JOB_STATES:
            break
        current = _running(reply.attempts)
        if current is None or current[0] == finished:
            if grid._closed.wait(poll_s):
                raise ClientError("the grid session closed")
            continue
        attempt, worker = current
        if attempt != followed:
            followed, offsets = attempt, dict.fromkeys(STREAMS, 0)
        ended = yield from _follow_attempt(store, router, job, attempt, worker, offsets,
                                           quiet_s)
        if ended:
            finished = attempt
        elif grid._closed.wait(poll_s):  # asked again, at most every poll_s
            raise ClientError("the grid session closed")
    result = store.result(job)
    results = reply.job.get("results") or {}
    if followed is None or results.get("attempt") != followed:
        offsets = dict.fromkeys(STREAMS, 0)  # the stored output is another attempt's
    for stream, data in (("stdout", result.stdout), ("stderr", result.stderr)):
        if len(data) > offsets[stream]:
            yield stream, data[offsets[stream]:]


def _running(attempts: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(attempt, worker) of the attempt running now, if any (attempts: newest first)."""
    for item in attempts:
        if item.get("kind") in ("assigned", "running") and item.get("worker"):
            return str(item["id"]), str(item["worker"])
    return None


def _follow_attempt(store: JobStore, router: FollowRouter, job: str, attempt: str,
                    worker: str, offsets: dict[str, int], quiet_s: float
                    ) -> Generator[Chunk, None, bool]:
    """Follow one attempt from ``offsets`` (updated); returns True when its eof with an
    outcome came, False when the follow should be asked again (or the job looked at)."""
    grid = store.grid
    fid = uuid.uuid4().hex
    chunks = router.open(fid, worker)
    streaming = False  # the worker streams to us until an eof, or until we say stop
    try:
        body = JobFollow(attempt=attempt, follow=fid, stdout_offset=offsets["stdout"],
                         stderr_offset=offsets["stderr"])
        try:
            grid.bus.request(grid.topics.worker_inbox(worker), body)
            streaming = True
        except RemoteError as err:
            if err.code in GONE:
                return False
            raise Refused(f"cannot follow job {job}: {err}", err.code or "error") from err
        except RequestTimeout:
            return False  # the worker is away: look at the job again
        except BusError as err:
            raise ClientError(f"cannot follow job {job}: {err}") from err
        while True:
            try:
                out = chunks.get(timeout=quiet_s)
            except queue.Empty:
                if grid._closed.is_set() or _running(store.show(job).attempts) != (
                        attempt, worker):
                    return False
                continue
            data = _decode(out.data)
            skip = max(0, offsets[out.stream] - out.offset)  # already seen
            if len(data) > skip:
                offsets[out.stream] = out.offset + len(data)
                yield out.stream, data[skip:]
            if out.eof:
                streaming = False
                return out.kind is not None
    finally:
        router.close(fid)
        if streaming and not grid._closed.is_set():
            _stop(grid, worker, attempt, fid)


def _stop(grid: Grid, worker: str, attempt: str, fid: str) -> None:
    """Tell the worker we left (Ctrl-C, a quiet attempt): it stops sending at once.
    Fire and forget: this runs while the caller unwinds."""
    try:
        grid.bus.send(grid.topics.worker_inbox(worker),
                      JobFollow(attempt=attempt, follow=fid, stop=True))
    except BusError as err:
        log.debug("could not stop follow %s: %s", fid, err)


def _decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        log.warning("a job.output chunk was not base64; dropped")
        return b""
