"""JobFollows: a running attempt's output, live, to the job's owner (``job.follow``;
docs/jobs.md, "Following a running job").

The attempt's stdout and stderr go to capped files (worker/job_files.py, flushed on each
write). A follower asks the worker running the attempt with ``job.follow`` {attempt,
follow, stdout_offset?, stderr_offset?}; only the job's owner may (the assignment carries
``owner``; an admin is refused like any other principal: the output is the owner's), and
the coordinator principal, which relays it to the job's dashboard page
(coordinator/http/job_output.py): its follows end after ``COORDINATOR_FOLLOW_S`` (it asks
again while a page still watches), so a relay whose last viewer left stops soon. The
request is answered ``ok`` and a thread of its own then reads both files from the given
offsets and sends what is there, then what comes, as ``job.output`` {attempt, follow, seq,
stream, offset, data (base64, at most ``CHUNK_BYTES``)} into the follower's inbox, until
the attempt ends: then the rest of the files, and a last message with ``eof`` and the
outcome (``kind``, ``exit_code``). A follow also ends after ``follow_s`` (eof without a
kind: the follower asks again, from its offsets, if it still wants to). A follower that
leaves says so: ``job.follow`` with ``stop`` and the same follow id ends that follow at
once (only for its sender), so an interrupted ``xcloud job logs -f`` or a closed dashboard
page stops the stream instead of it running on into an inbox nobody reads.

Bounded: at most ``MAX_PER_ATTEMPT`` followers per attempt and ``MAX_FOLLOWS`` per worker
(``busy`` beyond), the request draws from the sender's request bucket (the worker's
guard); each follower sends at most ``BURST_CHUNKS`` chunks per ``poll_s`` and waits for
the broker's PUBACK of each before the next, so a slow broker slows the follower, never
the command (the command writes to its files whatever happens here). A follower that
disappears costs one thread until the attempt ends or ``follow_s`` passes.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from broker.bus import Bus, Incoming
from schemas.job_messages import JobFollow, JobOutput
from schemas.messages import Ok
from worker.output import wait_published

if TYPE_CHECKING:
    from worker.job_attempts import Attempt

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024  # job.output.json bounds data at its base64 (87,384 chars)
MAX_PER_ATTEMPT = 4
MAX_FOLLOWS = 32
BURST_CHUNKS = 4  # per poll: at most 4 x 64 KiB every poll_s per follower
POLL_S = 0.2
FOLLOW_S = 3600.0
COORDINATOR_FOLLOW_S = 60.0
PUBLISH_TIMEOUT_S = 30.0
STREAMS = ("stdout", "stderr")
RUNNING = frozenset({"assigned", "running"})

AttemptLookup = Callable[[str], "Attempt | None"]


@dataclass
class _Follow:
    follow: str
    attempt: str
    inbox: str
    offsets: dict[str, int]
    follow_s: float = FOLLOW_S
    seq: int = 0
    files: dict[str, IO[bytes]] = field(default_factory=dict)
    sender: str = ""
    stopped: threading.Event = field(default_factory=threading.Event)


class JobFollows:
    """The followers of this worker's attempts (see the module docstring)."""

    def __init__(self, bus: Bus, lookup: AttemptLookup, directory: Callable[[str], Path],
                 *, follow_s: float = FOLLOW_S, poll_s: float = POLL_S,
                 max_per_attempt: int = MAX_PER_ATTEMPT,
                 max_follows: int = MAX_FOLLOWS, coordinator: str | None = None,
                 coordinator_follow_s: float = COORDINATOR_FOLLOW_S) -> None:
        self.bus = bus
        self.lookup = lookup  # attempt id -> the runner's Attempt (None: not here)
        self.directory = directory  # attempt id -> its directory (stdout, stderr files)
        self.follow_s = follow_s
        self.poll_s = poll_s
        self.max_per_attempt = max_per_attempt
        self.max_follows = max_follows
        self.coordinator = coordinator  # may follow any attempt (it relays to the dashboard)
        self.coordinator_follow_s = coordinator_follow_s
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}  # attempt -> followers now
        self._follows: dict[str, _Follow] = {}  # follow id -> the live follow
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def active(self, attempt: str | None = None) -> int:
        """Followers now (of ``attempt``, or all)."""
        with self._lock:
            if attempt is None:
                return sum(self._active.values())
            return self._active.get(attempt, 0)

    def close(self) -> None:
        """Stop every follow (their threads end at their next poll)."""
        self._stopping.set()
        with self._lock:
            threads = list(self._threads)
            for follow in self._follows.values():
                follow.stopped.set()
        for thread in threads:
            thread.join(PUBLISH_TIMEOUT_S + 1.0)

    # -- the request ---------------------------------------------------------------------

    def on_follow(self, incoming: Incoming) -> None:
        body: JobFollow = incoming.body
        sender = incoming.sender or ""
        if body.stop:
            self._stop_one(incoming, body, sender)
            return
        attempt = self.lookup(body.attempt)
        if attempt is None:
            self.bus.reply_error(incoming, "not_found",
                                 f"attempt {body.attempt} does not run here (any more): its "
                                 "output is in the job's results once it ends")
            return
        relaying = bool(self.coordinator) and sender == self.coordinator
        if sender != attempt.record.owner and not relaying:
            self.bus.reply_error(incoming, "forbidden",
                                 f"only the job's owner may follow attempt {body.attempt}",
                                 {"reason": "not_owner"})
            return
        inbox = self.bus.reply_inbox(incoming)
        if inbox is None or self._stopping.is_set():
            self.bus.reply_error(incoming, "unavailable", "this worker is stopping")
            return
        with self._lock:
            total = sum(self._active.values())
            mine = self._active.get(body.attempt, 0)
            if mine >= self.max_per_attempt or total >= self.max_follows:
                busy = True
            else:
                busy = False
                self._active[body.attempt] = mine + 1
        if busy:
            self.bus.reply_error(incoming, "busy",
                                 f"attempt {body.attempt} has too many followers (at most "
                                 f"{self.max_per_attempt}; {self.max_follows} per worker)")
            return
        follow = _Follow(follow=body.follow, attempt=body.attempt, inbox=inbox,
                         offsets={"stdout": int(body.stdout_offset or 0),
                                  "stderr": int(body.stderr_offset or 0)},
                         follow_s=min(self.follow_s, self.coordinator_follow_s) if relaying
                         else self.follow_s, sender=sender)
        self.bus.reply(incoming, Ok(detail={"attempt": body.attempt, "follow": body.follow}))
        log.info("%s follows attempt %s", sender, body.attempt)
        thread = threading.Thread(target=self._run, args=(follow, attempt),
                                  name=f"follow-{body.attempt}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            self._follows[body.follow] = follow
        thread.start()

    def _stop_one(self, incoming: Incoming, body: JobFollow, sender: str) -> None:
        """End the sender's own follow ``body.follow`` (another's id is not found)."""
        with self._lock:
            follow = self._follows.get(body.follow)
            if follow is not None and (follow.sender != sender
                                       or follow.attempt != body.attempt):
                follow = None
        if follow is None:
            self.bus.reply_error(incoming, "not_found",
                                 f"no follow {body.follow} of yours on attempt {body.attempt}")
            return
        follow.stopped.set()
        self.bus.reply(incoming, Ok(detail={"attempt": body.attempt, "follow": body.follow,
                                            "stopped": True}))

    # -- one follow ----------------------------------------------------------------------

    def _run(self, follow: _Follow, attempt: Attempt) -> None:
        try:
            self._stream(follow, attempt)
        except Exception as err:  # a follow never takes the worker down
            log.warning("following attempt %s stopped: %s", follow.attempt, err)
        finally:
            for fh in follow.files.values():
                fh.close()
            with self._lock:
                if self._follows.get(follow.follow) is follow:
                    del self._follows[follow.follow]
                left = self._active.get(follow.attempt, 1) - 1
                if left > 0:
                    self._active[follow.attempt] = left
                else:
                    self._active.pop(follow.attempt, None)

    def _stream(self, follow: _Follow, attempt: Attempt) -> None:
        deadline = time.monotonic() + follow.follow_s
        while True:
            if follow.stopped.is_set() and not self._stopping.is_set():
                log.info("follow %s of attempt %s stopped by its follower", follow.follow,
                         follow.attempt)
                return  # the follower left: it reads nothing more
            ended = attempt.record.phase not in RUNNING or attempt.done.is_set()
            if not ended and (time.monotonic() >= deadline or self._stopping.is_set()):
                self._send(follow, "stdout", b"", eof=True,
                           reason="the follow ended (time limit or worker stopping); "
                                  "ask again from your offsets")
                return
            if not self._send_some(follow, drain=ended):
                return  # the broker did not take a message in time: the follower re-asks
            if ended:
                result = attempt.record.result or {}
                self._send(follow, "stdout", b"", eof=True,
                           kind=str(result["kind"]) if result.get("kind") else None,
                           exit_code=result.get("exit_code"))
                return
            follow.stopped.wait(self.poll_s)  # set by a stop, and by close()

    def _send_some(self, follow: _Follow, *, drain: bool) -> bool:
        """Send new bytes of both files: at most BURST_CHUNKS, or everything (``drain``).
        False when the broker did not take a message."""
        sent = 0
        for stream in STREAMS:
            while drain or sent < BURST_CHUNKS:
                data = self._read(follow, stream)
                if not data:
                    break
                if not self._send(follow, stream, data):
                    return False
                follow.offsets[stream] += len(data)
                sent += 1
        return True

    def _read(self, follow: _Follow, stream: str) -> bytes:
        fh = follow.files.get(stream)
        if fh is None:
            try:
                fh = open(self.directory(follow.attempt) / stream, "rb")  # noqa: SIM115
            except OSError:
                return b""  # not created yet (inputs still arriving), or gone
            follow.files[stream] = fh
        try:
            fh.seek(follow.offsets[stream])
            return fh.read(CHUNK_BYTES)
        except OSError:
            return b""

    def _send(self, follow: _Follow, stream: str, data: bytes, *, eof: bool = False,
              kind: str | None = None, exit_code: Any = None,
              reason: str | None = None) -> bool:
        body = JobOutput(attempt=follow.attempt, follow=follow.follow, seq=follow.seq,
                         stream=stream, offset=follow.offsets[stream],
                         data=base64.b64encode(data).decode("ascii"), eof=eof or None,
                         kind=kind, exit_code=exit_code if isinstance(exit_code, int) else None,
                         reason=reason)
        follow.seq += 1
        info = self.bus.send(follow.inbox, body)
        if wait_published(info, PUBLISH_TIMEOUT_S):
            return True
        log.info("follow of attempt %s: the broker took no message in %ss; stopping",
                 follow.attempt, PUBLISH_TIMEOUT_S)
        return False
