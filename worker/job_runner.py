"""JobRunner: the worker's side of batch jobs (docs/jobs.md, "Running jobs (worker)").

On the worker's inbox, from the coordinator principal only (and behind the worker's
request guard):

- ``job.assign`` (alone, or carried in a report's answer): the attempt is persisted
  (worker/job_attempts.py) and only THEN answered ``ok`` (the acknowledgement the
  coordinator waits for), held back ``job_ack_wait_s`` for the attempt's report to
  answer it instead (worker/assign_answers.py); a repeated assign of a known attempt is
  answered ``ok`` again. Refused when the worker is stopping, has no free slot, or lacks
  the executor the job asks for.
- ``job.kill``: the attempt's command is stopped (TERM, KILL after the grace); the
  attempt ends ``cancelled``. An unknown or finished attempt is answered ``ok`` too.

And ``job.follow`` from the job's owner (or the coordinator, for the dashboard): the
attempt's output, live (worker/job_follow.py).

Each attempt (started by worker/job_launch.py): inputs (and stdin) from the input cache
into a fresh work dir, ``sh -c COMMAND`` in an executor session of its own
(``XCLOUD_JOB_ID``, ``XCLOUD_JOB_INDEX``, ``XCLOUD_ATTEMPT_ID`` in its environment;
the spec's cpus and memory as its limits; an image_archive app's image loaded first,
worker/image_archives.py), stdout and stderr to capped files. While the command runs the
attempt holds no thread: its exit comes from the executor's I/O loop (``notify_exit``),
``attempt.started`` and ``wall_s`` are loop timers. At its end the outputs are
collected, uploaded as the owner's data objects and the ``attempt.report`` kept on disk
and re-sent until acknowledged (worker/job_delivery.py): a job that runs while the
coordinator or the broker is down finishes, and its result is delivered once they are
back.

A worker killed mid-job finds its records when it restarts: attempts whose results were
known (uploading or reporting) carry on; attempts that were assigned or running are
cleaned up (their processes and containers are gone or killed by the executors' orphan
cleanup) and NOT reported: the worker may not claim ``worker_lost``; they simply stop
being listed in the heartbeat's ``attempts``, and the coordinator's reconciliation ends
them (worker_lost) and requeues the job.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.bus import Bus, Incoming, Lane
from broker.config import WorkerConfig
from broker.transfer import Peer, TransferEndpoint
from schemas.job_messages import AttemptStarted, JobAssign, JobFollow, JobKill
from schemas.messages import Ok
from schemas.outcome import ERROR_MAX
from schemas.topics import Topics
from worker import io_loop
from worker.assign_answers import HeldAnswers, deliver_carried
from worker.exec_auth import from_coordinator
from worker.executors.base import Executor, ExecutorError, ExitResult, SessionHandle
from worker.image_archives import ImageArchives
from worker.input_cache import FetchNotice, InputCache
from worker.job_attempts import Attempt as Attempt  # (re-exported: it was defined here)
from worker.job_attempts import AttemptRecord, AttemptStore, ReportSender, close_left_session
from worker.job_delivery import ResultDelivery
from worker.job_files import Captures, attempt_outcome
from worker.job_follow import JobFollows
from worker.job_gpus import GpuAllocator, GpuAsk
from worker.job_launch import AttemptLaunch, Outcome
from worker.job_slots import SlotLine
from worker.request_guard import WorkerRequestGuard
from worker.thread_reuse import ThreadReuse

log = logging.getLogger(__name__)

LANE = Lane.JOBS
MAX_LISTED = 64  # worker.heartbeat.json caps `attempts` at this
_ATTEMPT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KEEP_ENDED = 4096  # ended attempt ids remembered (a late duplicate job.assign is refused)
STARTED_AFTER_S = 0.25  # attempt.started only for commands that run longer than this
CAPS_S = 10.0  # the caps (with the cache's summary) are republished at most this often

ExecutorFor = Callable[[str], Executor]


class JobRunner:
    """The attempts of one worker (see the module docstring)."""

    def __init__(self, bus: Bus, topics: Topics, wid: str, config: WorkerConfig,
                 state_dir: Path | str, *, executor_for: ExecutorFor, executors: list[str],
                 transfers: TransferEndpoint, cache: InputCache,
                 guard: WorkerRequestGuard | None = None,
                 used_slots: Callable[[], int] = lambda: 0,
                 caps_changed: Callable[[], None] | None = None,
                 kill_grace_s: float = 5.0, gpus: GpuAllocator | None = None) -> None:
        self.bus = bus
        self.topics = topics
        self.wid = wid
        self.config = config
        self.coordinator = config.coordinator_principal or "coordinator"
        self.peer = Peer.coordinator(topics, self.coordinator)
        self.store = AttemptStore(state_dir)
        self.executor_for = executor_for
        self.executors = list(executors)
        self.transfers = transfers
        self.cache = cache
        self.archives = ImageArchives(state_dir, cache)  # image_archive apps' images
        self.guard = guard or WorkerRequestGuard(bus, config)
        self.used_slots = used_slots  # slots other work holds (reservations)
        self.kill_grace_s = kill_grace_s
        # the caps (with the cache's summary) republished when the cache fetched something
        self.caps_notice = FetchNotice(cache, caps_changed, CAPS_S)
        self.output_cap = int(config.job_output_bytes)
        # job.assign messages carried in a report's answer: as if received alone
        carried = functools.partial(deliver_carried, bus, topics.inbox_for(
            topics.worker_inbox(wid), self.coordinator), self.coordinator)
        self.reports = ReportSender(bus, topics, self.store, on_done=self._forget,
                                    remove=self._remove_dir, carried=carried)
        # the ok to job.assign, held until the report answers it or the wait ends
        self.answers = HeldAnswers(bus, float(config.job_ack_wait_s), io_loop.shared(),
                                   durable=self.store.sync,
                                   offload=lambda call: self._spawn(call, "answers"))
        self._lock = threading.Lock()
        self._attempts: dict[str, Attempt] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()  # attempts done here lately
        # Attempts, closes and kills run on reused threads (worker/thread_reuse.py);
        # ``close`` waits for the calls under way.
        self._threads = ThreadReuse("jobs")
        self._calls = 0
        self._calls_done = threading.Condition(threading.Lock())
        self._stopping = threading.Event()
        self.delivery = ResultDelivery(self.store, transfers, self.peer, self.reports,
                                       self._stopping, self._save)
        # Attempts beyond the slots wait their turn here (worker/job_slots.py).
        self.line = SlotLine(lambda: int(self.config.slots), self.used_slots)
        self._registered = False
        # job.follow: the owner (or the coordinator) reads an attempt's output live
        self.follows = JobFollows(bus, self._attempt, self.store.path,
                                  coordinator=self.coordinator)
        # GPUs: which devices each attempt holds (worker/job_gpus.py, docs/gpus.md)
        self.gpus = gpus or GpuAllocator()
        self.gpus.holder_live = self._holds_gpus
        # from an accepted attempt to its running command (worker/job_launch.py)
        self.launch = AttemptLaunch(self.store, cache, self.archives, self.gpus,
                                    self.output_cap, self._save)

    # -- lifecycle ---------------------------------------------------------------------

    def register(self) -> None:
        """Recover what a previous run left, then put the handlers on the bus (before
        ``bus.start()``)."""
        if self._registered:
            return
        self._registered = True
        self.store.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._recover()
        self.reports.start()
        self.bus.on_inbox(JobAssign.TYPE, self.guard.wrap(self.on_assign), lane=LANE)
        self.bus.on_inbox(JobKill.TYPE, self.guard.wrap(self.on_kill), lane=LANE)
        self.bus.on_inbox(JobFollow.TYPE, self.guard.wrap(self.follows.on_follow), lane=LANE)

    def close(self) -> None:
        """A clean stop: running commands are stopped and their attempts forgotten (the
        coordinator requeues them: they leave the heartbeat); finished attempts keep
        their uploads and reports on disk for the next run."""
        self._stopping.set()
        for attempt in self.all():
            if attempt.holds_slot:
                self._kill(attempt, "the worker is stopping")
        with self._calls_done:
            self._calls_done.wait_for(lambda: self._calls == 0, self.kill_grace_s + 10.0)
        self._threads.close()
        self.answers.close()
        self.follows.close()
        self.reports.close()
        self.archives.close()
        self.store.close()  # the journal's file (a late write reopens it)

    def all(self) -> list[Attempt]:
        with self._lock:
            return list(self._attempts.values())

    def _holds_gpus(self, attempt_id: str) -> bool:
        """Whether an attempt still holds its GPUs: until it stops holding a slot (one
        being accepted, not yet listed, does)."""
        with self._lock:
            attempt = self._attempts.get(attempt_id)
            if attempt is None:
                return attempt_id not in self._ended
            return attempt.holds_slot

    def _attempt(self, attempt_id: str) -> Attempt | None:
        with self._lock:
            return self._attempts.get(attempt_id)

    def attempt_ids(self) -> list[str]:
        """For the heartbeat: every attempt not yet acknowledged, oldest first."""
        return [a.id for a in self.all()][:MAX_LISTED]

    def running_count(self) -> int:
        """Attempts holding a slot (assigned or running)."""
        return sum(1 for a in self.all() if a.holds_slot)

    def running_items(self) -> list[dict[str, str]]:
        return [{"kind": "job", "id": a.id} for a in self.all() if a.holds_slot]

    # -- handlers ----------------------------------------------------------------------

    def on_assign(self, incoming: Incoming) -> None:
        if not from_coordinator(self.bus, self.coordinator, incoming):
            return
        body: JobAssign = incoming.body
        with self._lock:
            known = body.attempt in self._attempts
            ended = body.attempt in self._ended
        if known:
            self.answers.again(body.attempt, incoming)
            return
        if ended:  # a late duplicate (a redelivery): an attempt never runs twice
            self.bus.reply_error(incoming, "conflict",
                                 f"attempt {body.attempt} already ran on {self.wid}")
            return
        if self._stopping.is_set():
            self.bus.reply_error(incoming, "unavailable", f"worker {self.wid} is stopping")
            return
        if not _ATTEMPT_ID.match(body.attempt):  # it names a directory here
            self.bus.reply_error(incoming, "invalid", f"bad attempt id {body.attempt!r}")
            return
        spec = dict(body.spec)
        executor = str((spec.get("requirements") or {}).get("executor") or self.executors[0])
        if executor not in self.executors:
            self.bus.reply_error(incoming, "unsupported",
                                 f"worker {self.wid} has no {executor} executor")
            return
        used = self.used_slots()  # a reservation's slots: never queue behind those
        room = max(1, int(self.config.slots)) + (
            max(0, int(self.config.job_queue)) if not used else 0)
        if self.running_count() + used >= room:
            self.bus.reply_error(incoming, "busy", f"worker {self.wid} has no free slot")
            return
        gpu_ask = GpuAsk.of(spec)
        if self.gpus.take(body.attempt, gpu_ask) is None:
            self.bus.reply_error(incoming, "busy", f"worker {self.wid} has no "
                                 f"{gpu_ask.count} free GPU(s) that match")
            return
        record = AttemptRecord(attempt=body.attempt, job=body.job, owner=body.owner,
                               spec=spec, inputs=list(body.inputs), stdin=body.stdin,
                               executor=executor, assigned_at=time.time())
        try:
            self.store.save(record)  # durable before its ok (assign_answers.py)
        except OSError as err:
            log.error("cannot persist attempt %s: %s", body.attempt, err)
            self.store.remove(body.attempt)
            self.gpus.release(body.attempt)
            self.bus.reply_error(incoming, "internal", f"cannot persist the attempt: {err}")
            return
        attempt = Attempt(record)
        with self._lock:
            self._attempts[attempt.id] = attempt
        self.answers.hold(attempt.id, incoming)  # ok, unless its report comes first
        # DEBUG: at full rate an INFO line per step was ~5% of the worker's CPU; the
        # attempt's INFO line is its report's (worker/job_attempts.py), with its job
        log.debug("attempt %s of job %s (owner %s) accepted", attempt.id, record.job,
                  record.owner)
        self._spawn(lambda: self._run(attempt), f"attempt-{attempt.id}")

    def on_kill(self, incoming: Incoming) -> None:
        if not from_coordinator(self.bus, self.coordinator, incoming):
            return
        body: JobKill = incoming.body
        with self._lock:
            attempt = self._attempts.get(body.attempt)
        if attempt is None or not attempt.holds_slot:
            self.bus.reply(incoming, Ok(detail={"attempt": body.attempt, "known": False}))
            return
        reason = body.reason or "killed by the coordinator"
        self._spawn(lambda: self._kill(attempt, reason), f"kill-{attempt.id}")
        self.bus.reply(incoming, Ok(detail={"attempt": attempt.id}))

    def _kill(self, attempt: Attempt, reason: str) -> None:
        with attempt.lock:
            if attempt.kill_reason is None:
                attempt.kill_reason = reason
            task = attempt.task
        if task is None:
            self.line.wake()  # it may be waiting for a slot: let it see kill_reason
            return  # not started: the runner sees kill_reason before it starts
        log.info("stopping attempt %s: %s", attempt.id, reason)
        try:
            self.executor_for(attempt.record.executor).stop(task, self.kill_grace_s)
        except ExecutorError as err:
            log.warning("cannot stop attempt %s: %s", attempt.id, err)

    # -- one attempt -------------------------------------------------------------------

    def _run(self, attempt: Attempt) -> None:
        """Up to the command's start on this (reused) thread; its end comes back from the
        executor's I/O loop (``_watch``), so no thread waits while a command runs."""
        if not self.line.take(attempt.id, lambda: attempt.kill_reason is not None
                              or self._stopping.is_set()):  # killed or stopping meanwhile
            self._conclude(attempt, {"kind": "cancelled",
                                     "error": (attempt.kill_reason or "")[:ERROR_MAX]}, None)
            return
        try:
            outcome = self.launch.launch(attempt, self.executor_for(attempt.record.executor))
            if outcome is None:  # it runs: the loop ends it
                assert attempt.executor is not None
                self._watch(attempt, attempt.executor, attempt.task)
        except Exception as err:  # never leave an attempt without an end
            log.exception("attempt %s failed", attempt.id)
            outcome = {"kind": "input_failed", "error": f"worker error: {err}"[:ERROR_MAX]}, None
        if outcome is not None:  # it never ran
            self.line.free()
            self._conclude(attempt, *outcome)

    def _conclude(self, attempt: Attempt, result: dict[str, Any],
                  captures: Captures | None) -> None:
        """The attempt's end is known: persist and deliver it (or drop it when stopping).

        Its session (leftover processes, cgroup, work dir; the outputs are out of it by
        now) is closed after the report is on its way, off the path from a command's end
        to its report: on this thread when there is nothing to upload, else beside the
        uploads. While the worker stops it is closed first, before the attempt is dropped."""
        record = attempt.record
        close = self._closer(attempt)
        if self._stopping.is_set() and (captures is None or attempt.kill_reason is not None):
            if close is not None:
                close()
            self._drop(attempt)  # the worker's own stop: the coordinator requeues it
            return
        record.result = result
        record.ended_at = record.ended_at or time.time()
        record.phase = "finished"
        uploads = self.delivery.has_uploads(record)
        if uploads:  # else deliver() writes "reported" at once
            self._save(record)
        if close is not None and (uploads or self._stopping.is_set()):
            if self._stopping.is_set():
                close()
            else:
                self._spawn(close, f"close-{attempt.id}")
            close = None
        self.caps_notice.check()
        self.delivery.deliver(record, uploads=uploads)
        if close is not None:
            close()

    def _closer(self, attempt: Attempt) -> Callable[[], None] | None:
        """What closes the attempt's session, if it opened one (until it has, the
        attempt's directory, which holds the work dir, stays: ``_remove_dir``)."""
        handle, executor = attempt.handle, attempt.executor
        if handle is None or executor is None:
            return None
        with self._lock:
            attempt.closing = True
        return functools.partial(self._close_session, executor, handle, attempt)

    def _close_session(self, executor: Executor, handle: SessionHandle,
                       attempt: Attempt) -> None:
        try:
            executor.close_session(handle)
        except Exception:
            log.exception("closing the session of attempt %s failed", attempt.id)
        finally:
            with self._lock:
                attempt.closing = False
                remove = attempt.remove_after_close
            if remove:
                self.store.remove(attempt.id)

    def _remove_dir(self, attempt_id: str) -> None:
        """The report was acknowledged: the attempt's directory goes, after its session's
        close when that is still under way (both remove the work dir)."""
        with self._lock:
            attempt = self._attempts.get(attempt_id)
            if attempt is not None and attempt.closing:
                attempt.remove_after_close = True
                return
        self.store.remove(attempt_id)

    # -- a running command, on the executor's I/O loop ----------------------------------

    def _watch(self, attempt: Attempt, executor: Executor, task: Any) -> None:
        """Hand the running command to the loop: its exit (``notify_exit``), and one timer
        at a time, first for ``attempt.started`` (only for a command still running after
        STARTED_AFTER_S: a short job's start comes with its report, one request and commit
        fewer per job), then for the wall clock. Counted as a call under way (``close``)."""
        with self._calls_done:
            self._calls += 1
        wall = float(attempt.record.spec["wall_s"]) if attempt.record.spec.get("wall_s") \
            else None
        loop = executor.io_loop or io_loop.shared()
        quick = STARTED_AFTER_S if wall is None else min(wall, STARTED_AFTER_S)
        with attempt.lock:
            attempt.timer = loop.call_later(quick, self._on_started_timer, attempt, loop, wall,
                                            quick)
        try:
            executor.notify_exit(task, functools.partial(self._exited, attempt))
        except Exception as err:
            log.exception("cannot watch the command of attempt %s", attempt.id)
            self._exited(attempt, ExitResult(exit_code=None, error=f"worker error: {err}"))

    def _on_started_timer(self, attempt: Attempt, loop: io_loop.IoLoop, wall: float | None,
                          quick: float) -> None:
        with attempt.lock:
            if attempt.exit is not None:
                return
            if wall is not None and wall > quick:
                attempt.timer = loop.call_later(wall - quick, self._on_wall, attempt)
        self._spawn(functools.partial(self._notify_started, attempt.id), "started")
        if wall is not None and wall <= quick:
            self._on_wall(attempt)

    def _on_wall(self, attempt: Attempt) -> None:
        with attempt.lock:
            if attempt.exit is not None or attempt.timed_out:
                return
            attempt.timed_out = True
        self._spawn(functools.partial(self._stop_overdue, attempt), "wall")

    def _stop_overdue(self, attempt: Attempt) -> None:
        log.info("attempt %s passed its wall clock (%ss); stopping it", attempt.id,
                 attempt.record.spec.get("wall_s"))
        assert attempt.executor is not None
        result = None
        try:
            result = attempt.executor.stop(attempt.task, self.kill_grace_s)
        except ExecutorError as err:
            log.warning("cannot stop attempt %s: %s", attempt.id, err)
        self._exited(attempt, result or ExitResult(exit_code=None,
                                                   error="the command did not stop"))

    def _exited(self, attempt: Attempt, result: ExitResult) -> None:
        """The command's result (from the loop: must not block); the rest of the attempt
        goes on a reused thread. The first call wins."""
        with attempt.lock:
            if attempt.exit is not None:
                return
            attempt.exit = result
            timer, attempt.timer = attempt.timer, None
        if timer is not None:
            timer.cancel()
        # (counted as a call by _watch: _tracked ends it)
        self._threads.run(self._tracked, functools.partial(self._finish, attempt, result))

    def _finish(self, attempt: Attempt, result: ExitResult) -> None:
        record = attempt.record
        try:
            record.ended_at = time.time()
            captures = attempt.captures
            assert captures is not None
            assert attempt.workdir is not None
            captures.close()
            outcome: Outcome = attempt_outcome(
                job=record.job, spec=record.spec, result=result,
                timed_out=attempt.timed_out,
                kill_reason=attempt.kill_reason, captures=captures, workdir=attempt.workdir,
                outputs_dir=self.store.path(record.attempt) / "outputs"), captures
        except Exception as err:  # never leave an attempt without an end
            log.exception("attempt %s failed", attempt.id)
            outcome = {"kind": "input_failed", "error": f"worker error: {err}"[:ERROR_MAX]}, None
        self.line.free()
        self._conclude(attempt, *outcome)

    def _notify_started(self, attempt_id: str) -> None:
        """``attempt.started``: best effort (the heartbeat's ``attempts`` says it too)."""
        try:
            self.bus.request_async(self.topics.coord_inbox, AttemptStarted(attempt=attempt_id))
        except Exception as err:
            log.debug("attempt.started %s not sent: %s", attempt_id, err)

    # -- recovery and bookkeeping ------------------------------------------------------

    def _recover(self) -> None:
        for record in self.store.load_all():
            if record.phase in ("assigned", "running"):
                log.warning("attempt %s of job %s was %s when the worker stopped; the "
                            "coordinator requeues it", record.attempt, record.job,
                            record.phase)
                close_left_session(record, self.executor_for)
                self.store.remove(record.attempt)
                continue
            attempt = Attempt(record)
            with self._lock:
                self._attempts[attempt.id] = attempt
            if record.phase == "finished":
                log.info("attempt %s: resuming the upload of its results", attempt.id)
                self._spawn(functools.partial(self.delivery.deliver, record),
                            f"deliver-{attempt.id}")
            else:
                self.reports.add(record)

    def _drop(self, attempt: Attempt) -> None:
        self.store.remove(attempt.id)
        self._forget(attempt.id)

    def _forget(self, attempt_id: str) -> None:
        self.answers.spare(attempt_id)  # its report was answered: no ok to send
        with self._lock:
            attempt = self._attempts.pop(attempt_id, None)
            self._ended[attempt_id] = None
            while len(self._ended) > KEEP_ENDED:
                self._ended.popitem(last=False)
        if attempt is not None:
            attempt.done.set()

    def _save(self, record: AttemptRecord, *, durable: bool = False) -> None:
        try:
            self.store.save(record, durable=durable)
        except OSError as err:
            log.error("cannot persist attempt %s: %s", record.attempt, err)

    def _spawn(self, target: Callable[[], None], name: str) -> None:  # noqa: ARG002
        with self._calls_done:
            self._calls += 1
        self._threads.run(self._tracked, target)

    def _tracked(self, target: Callable[[], None]) -> None:
        try:
            target()
        finally:
            with self._calls_done:
                self._calls -= 1
                if not self._calls:  # only close() waits, for none left
                    self._calls_done.notify_all()
