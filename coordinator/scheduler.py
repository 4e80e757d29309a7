"""The batch scheduler: queued jobs to free workers, attempts to their end (docs/jobs.md).

One thread runs a *pass* every ``jobs.pass_s`` seconds and whenever something may have
freed or added work (a submit, a release, an attempt's end, a worker's state change):

1. live attempts of workers found lost or gone offline end ``worker_lost``;
2. assignments no worker acknowledged within ``jobs.assign_ack_s`` end
   ``lease_expired`` (and the worker is told ``job.kill``: no ghost tasks);
3. free capacity is counted per online, non-draining, non-reserved worker from its
   caps (slots; cpus and memory per slot) minus its live attempts;
4. only the head of the queue is read: ``free slots x candidates_per_slot`` jobs in
   priority then submission order (one index walk; a few pages at most when the head
   matches no free worker), so a pass stays cheap with 100,000 jobs queued;
5. each job goes to the matching worker with the most free slots: a new attempt (its id
   is the fencing token) is committed, then ``job.assign`` is sent; the worker's ok (its
   acknowledgement, or the attempt's accepted report) is handled by
   coordinator/assign_acks.py, where nothing waits.

``fill`` runs steps 3–5 for one worker on the caller's thread, when that worker's report
freed a slot: the assignments ride in the report's answer (``attempt.recorded``). Its
first page is as many jobs as that worker has free slots (the full pages follow when
those do not match it).

Heartbeats are reconciled both ways (``on_attempts``): an acknowledged attempt missing
from ``jobs.missed_heartbeats`` heartbeats in a row ends ``lease_expired``; an attempt a
worker lists that is not live there is killed (``job.kill``, at most ``max_kills`` per
worker per ``kill_resend_s``, each at most once per ``kill_resend_s``). A heartbeat costs
one indexed query of that worker's live attempts, never work in the queue's size.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from broker.bus import Bus, BusError
from broker.config import JobsConfig
from broker.rate_limit import TokenBuckets
from coordinator import gpu_capacity, job_apps, job_deps, job_matching
from coordinator.assign_acks import AssignAcks
from coordinator.errors import CoordinatorError
from coordinator.fair_share import FairShare
from coordinator.job_event_outbox import JobEventOutbox
from coordinator.job_locality import locality_score
from coordinator.job_prefetch import prefetch_pass, steal_pass
from coordinator.job_replicas import place_replica
from coordinator.job_state import AttemptKind, JobState
from coordinator.job_unmatchable import UnmatchableCheck
from coordinator.registry import WorkerRegistry
from coordinator.store import Store, WorkerRecord
from coordinator.store.apps import Unresolvable
from coordinator.store.job_records import AttemptRecord, JobChange, JobRecord
from coordinator.store.values import dumps
from coordinator.worker_state import WorkerState
from schemas.codec import to_wire
from schemas.job_messages import (
    ASSIGN_IN_ANSWER_BYTES,
    ASSIGN_IN_ANSWER_MAX,
    ASSIGN_IN_ANSWER_SINCE,
    JobAssign,
    JobKill,
)
from schemas.messages import Error
from schemas.topics import Topics

log = logging.getLogger(__name__)

REFUSED_BACKOFF_S = 30.0  # a worker that answered busy waits for its next heartbeat, at most this
MAX_PAGES = 4  # queue pages read in one pass when the head matches no free worker
RECONCILE_GRACE_S = 1.0  # an attempt acknowledged this recently may predate a heartbeat
SENT_MAX = 10_000


class Capacity:
    """What one worker can still take in this pass."""

    scheduler: JobScheduler | None = None  # whose pass (replicated jobs ask its store)

    def __init__(self, worker: WorkerRecord, usage: tuple[int, int, int],
                 gpus_held: int = 0) -> None:
        self.worker = worker
        self.gpus_held = gpus_held  # GPUs its live attempts (and this pass) hold
        slots = max(worker.slots, 1)
        self.cpus_per_slot = max(worker.cpus, 1) / slots
        self.memory_per_slot = worker.memory_bytes / slots if worker.memory_bytes else 0.0
        count, cpus, memory = usage
        self.free = slots - max(count, self._slots_for(cpus, memory) if count else 0)

    def _slots_for(self, cpus: int, memory: int) -> int:
        by_cpu = math.ceil(cpus / self.cpus_per_slot - 1e-9)
        by_mem = (math.ceil(memory / self.memory_per_slot - 1e-9)
                  if self.memory_per_slot else 0)
        return max(1, by_cpu, by_mem)

    def slots_for(self, job: JobRecord) -> int:
        return self._slots_for(job.cpus, job.memory_bytes)

    def fits_gpus(self, job: JobRecord) -> bool:
        """Whether enough of its GPUs that meet the job's asks are free (docs/gpus.md)."""
        ask = gpu_capacity.job_ask(job.spec)
        return not ask.count or gpu_capacity.free_gpus(
            self.worker.caps, ask, self.gpus_held) >= ask.count

    def take(self, job: JobRecord) -> int:
        """Count ``job`` as assigned here in this pass; returns the slots it took."""
        need = self.slots_for(job)
        self.free -= need
        self.gpus_held += gpu_capacity.job_ask(job.spec).count
        return need


def requirement_mismatch(worker: WorkerRecord, spec: dict[str, Any]) -> str | None:
    """Why ``worker`` cannot run a job with this spec's requirements, or None (the
    per-requirement predicates of coordinator/job_matching.py, shared with jobs.why)."""
    return job_matching.requirement_mismatch(worker, spec)


ENVELOPE_BYTES = 200  # a job.assign's envelope fields, on top of its body


def agent_version(caps: dict[str, Any]) -> tuple[int, int]:
    """(major, minor) of a worker's ``agent_version`` ((0, 0) when unreadable)."""
    parts = str(caps.get("agent_version") or "").split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return 0, 0


class JobScheduler:
    """See the module docstring. ``start`` after the store is open and before the bus
    connects; ``stop`` before the bus stops, ``join`` after."""

    def __init__(self, bus: Bus, store: Store, registry: WorkerRegistry, config: JobsConfig,
                 topics: Topics, *, clock: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self.store = store
        self.registry = registry
        self.config = config
        self.topics = topics
        self._clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acks: AssignAcks | None = None
        self._gone: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._kills = TokenBuckets(config.max_kills / max(config.kill_resend_s, 1e-3),
                                   config.max_kills, clock=clock)
        self._killed: dict[tuple[str, str], float] = {}
        self._refused: dict[str, float] = {}  # wid -> when it answered busy
        self.passes = 0
        self.last_pass_s = 0.0
        self._expiry_due = 0.0  # when a pass next looks for unacknowledged assignments
        self._pass_caps: list[Capacity] = []
        # fill(): one worker's free slots filled from its report's handler, the
        # assignments carried in the report's answer (not sent): under the pass lock
        self._pass_lock = threading.Lock()
        self._only: str | None = None
        self._carry: list[dict[str, Any]] | None = None
        self._carry_bytes = 0
        self._carries: dict[str, bool] = {}  # wid -> its agent takes carried assignments
        self.carried = 0  # assignments carried in reports' answers (the rest: job.assign)
        self.fair = FairShare(store, config, clock)  # who gets the next slot
        self.events = JobEventOutbox(bus, topics, flush_s=config.event_flush_s)
        self.unmatchable = UnmatchableCheck(  # holds jobs no known worker can run
            store, lambda: self.config.unmatchable_hold_s, self.announce)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self.registry.state_listeners.append(self.on_worker_state)
        self.registry.attempt_listeners.append(self.on_attempts)
        self.registry.caps_listeners.append(self.on_caps)
        self._acks = AssignAcks(self.bus, self.store, self.topics, self, clock=self._clock)
        self.events.start()
        self._recover()
        self._thread = threading.Thread(target=self._loop, name="job-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self.on_worker_state in self.registry.state_listeners:
            self.registry.state_listeners.remove(self.on_worker_state)
        if self.on_attempts in self.registry.attempt_listeners:
            self.registry.attempt_listeners.remove(self.on_attempts)
        if self.on_caps in self.registry.caps_listeners:
            self.registry.caps_listeners.remove(self.on_caps)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._acks is not None:
            self._acks.close()
        self.events.stop()  # what the last pass announced still goes out

    def join(self) -> None:
        if self._acks is not None:
            self._acks.close()
            self._acks = None

    def poke(self) -> None:
        """Run a pass soon (something may have changed)."""
        self._wake.set()

    def _recover(self) -> None:
        """Attempts of workers that are gone (a previous coordinator's) end at once."""
        for attempt in self.store.live_attempts():
            worker = self.store.get_worker(attempt.worker_id)
            if worker is None or not worker.state.is_live:
                self._gone.put(attempt.worker_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.pass_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                self.run_pass()
            except CoordinatorError as err:
                log.error("scheduler pass failed: %s", err)
            except Exception:
                log.exception("scheduler pass failed")
            self.passes += 1
            self.last_pass_s = time.monotonic() - started

    # -- events ---------------------------------------------------------------------------

    def announce(self, changes: Iterable[JobChange]) -> None:
        """Tell each job's owner of its job's state change, and the admins' feed (qos 0:
        a live view; docs/security.md), through the events outbox: several changes per
        message while they come fast (coordinator/job_event_outbox.py)."""
        changes = list(changes)
        self.fair.note_changes(changes)  # a requeue: its owner has queued work
        self.events.put(changes)

    def kill(self, aid: str, wid: str, reason: str) -> None:
        if not wid:
            return
        try:
            self.bus.send(self.topics.worker_inbox(wid),
                          JobKill(attempt=aid, reason=reason[:1024]))
        except BusError as err:
            log.warning("job.kill %s to %s not sent: %s", aid, wid, err)

    def end(self, attempt: AttemptRecord, kind: AttemptKind, error: str) -> None:
        changes = self.store.end_attempt(attempt.id, kind, error=error, now=self._clock())
        if changes:
            log.info("attempt %s of job %s on %s: %s (%s) -> job %s", attempt.id,
                     attempt.job_id, attempt.worker_id, kind.value, error,
                     changes[0].state.value)
        self.announce(changes)
        self.poke()

    def on_worker_state(self, wid: str, _old: WorkerState, new: WorkerState,
                        _reason: str) -> None:
        """Registry listener: a lost or offline worker's attempts end at the next pass
        (run now); any change may free or remove capacity."""
        if new in (WorkerState.LOST, WorkerState.OFFLINE):
            self._gone.put(wid)
        self.poke()

    def on_caps(self, wid: str) -> None:
        """Registry listener: a worker joined or changed its capabilities (slots)."""
        self._carries.pop(wid, None)  # (its agent may be another version now)
        self.poke()

    def on_attempts(self, wid: str, listed: list[str]) -> None:
        """Registry listener: one worker's latest heartbeat ``attempts``."""
        now = self._clock()
        self._refused.pop(wid, None)  # what it runs is known again: offer it work
        missing, unknown = self.store.note_heartbeat(
            wid, listed[:64], acked_before=now - RECONCILE_GRACE_S, now=now)
        limit = max(1, self.config.missed_heartbeats)
        for aid, count in missing:
            if count >= limit:
                attempt = self.store.get_attempt(aid)
                if attempt is not None:
                    self.end(attempt, AttemptKind.LEASE_EXPIRED,
                             f"worker {wid} stopped reporting it ({count} heartbeats)")
        for aid in unknown:
            if now - self._killed.get((wid, aid), -1e9) < self.config.kill_resend_s:
                continue
            if self._kills.take(wid) > 0:
                break
            self._killed[(wid, aid)] = now
            log.info("worker %s runs attempt %s that is not current there: killing it",
                     wid, aid)
            self.kill(aid, wid, "not a current attempt of this worker")
        if len(self._killed) > SENT_MAX:
            self._killed = {k: t for k, t in self._killed.items()
                            if now - t < self.config.kill_resend_s}

    # -- the pass -------------------------------------------------------------------------

    def run_pass(self) -> int:
        """One pass (see the module docstring); returns the number of jobs assigned."""
        # one pooled connection for the pass's dozen store calls
        with self._pass_lock, self.store.held():
            return self._run_pass()

    def fill(self, wid: str) -> list[dict[str, Any]] | None:
        """Fill the slots that ``wid``'s accepted report freed, now, on the caller's
        thread: the ``job.assign`` messages to carry in the report's answer
        (``attempt.recorded``; at most ``ASSIGN_IN_ANSWER_MAX``, and within
        ``ASSIGN_IN_ANSWER_BYTES``: the rest is sent as usual). None: that worker's agent
        takes assignments only as ``job.assign`` (older than 0.3): poke instead.

        BOINC's scheduler RPC in short: a worker's report and its next work in one round
        trip, with no pass on the scheduler's thread in between (docs/jobs.md)."""
        if not self._takes_carried(wid):
            return None
        carried: list[dict[str, Any]] = []
        with self._pass_lock, self.store.held():
            self._only, self._carry, self._carry_bytes = wid, carried, 0
            try:
                self._match()
            finally:
                self._only, self._carry = None, None
        return carried

    def _takes_carried(self, wid: str) -> bool:
        known = self._carries.get(wid)
        if known is None:
            worker = self.store.get_worker(wid)
            known = worker is not None and agent_version(worker.caps) >= ASSIGN_IN_ANSWER_SINCE
            self._carries[wid] = known
        return known

    def _run_pass(self) -> int:
        now = self._clock()
        gone: set[str] = set()
        while not self._gone.empty():
            gone.add(self._gone.get_nowait())
        for wid in sorted(gone):
            worker = self.store.get_worker(wid)
            if worker is not None and worker.state.is_live:
                continue  # back already
            for attempt in self.store.live_attempts(wid):
                self.end(attempt, AttemptKind.WORKER_LOST, f"worker {wid} is "
                         f"{worker.state.value if worker else 'gone'}")
        periodic = now >= self._expiry_due  # at most once per pass_s: coarse deadlines
        if periodic:
            self._expiry_due = now + min(self.config.pass_s, self.config.assign_ack_s)
            deadline = now - self.config.assign_ack_s
            for attempt in self.store.unacknowledged_before(deadline):
                self.end(attempt, AttemptKind.LEASE_EXPIRED, f"worker {attempt.worker_id} "
                         f"did not acknowledge it within {self.config.assign_ack_s:g}s")
                self.kill(attempt.id, attempt.worker_id, "not acknowledged in time")
        assigned = self._match()
        if periodic:
            self._steal()
            self.unmatchable.run(now)
        return assigned

    def _capacities(self) -> list[Capacity]:
        only = self._only  # (fill: that worker alone, its rows alone read)
        reserved = self.store.reserved_worker_ids()
        usage = self.store.attempt_usage(only)
        now = self._clock()
        refused = {wid for wid, at in self._refused.items()
                   if now - at < REFUSED_BACKOFF_S}
        workers = [w for w in self.store.schedulable_workers(only)
                   if w.id not in reserved and w.id not in refused]
        gpus_held = (self.store.attempt_gpu_usage()
                     if any(gpu_capacity.caps_gpus(w.caps) for w in workers) else {})
        caps = [Capacity(w, usage.get(w.id, (0, 0, 0)), gpus_held.get(w.id, 0))
                for w in workers]
        for cap in caps:
            cap.scheduler = self
        self._pass_caps = caps  # all of them, full ones too: for prefetch_pass
        return [c for c in caps if c.free > 0]

    def _match(self) -> int:
        if not self.store.has_queued():
            return 0  # nothing queued: the workers need not be read
        free = self._capacities()
        total = sum(c.free for c in free)
        assigned = 0
        page = max(1, total * max(1, self.config.candidates_per_slot))
        # A fill (one worker's freed slots) reads first only as many jobs as it has
        # slots: the head of the queue mostly matches, and each row read is decoded
        # (spec and all); the full pages follow when it does not.
        size = total if self._only is not None else page
        offset = 0
        pages = MAX_PAGES
        if total > 0 and self.fair.applies():  # several owners queued: fair_share.py
            assigned, total = self.fair.match(self, free, total)
            pages = 0
        for _ in range(pages):
            if total <= 0:
                break
            jobs = self.store.queued_jobs(size, offset)
            skipped = 0
            for job in jobs:
                if total <= 0:
                    break
                target = self._place(job, free)
                if target is None:
                    skipped += 1
                    continue
                if self._assign(job, target):
                    need = target.take(job)
                    total -= need
                    assigned += 1
                    free = [c for c in free if c.free > 0]
            if len(jobs) < size or total <= 0:
                break
            offset += skipped  # assigned jobs left the queue; skip the unplaceable ones
            size = page
        if total <= 0 and self.config.prefetch > 0:  # every slot taken: jobs still wait
            assigned += prefetch_pass(self, self._pass_caps)
        return assigned

    # -- for coordinator/job_prefetch.py ---------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def assign(self, job: JobRecord, target: Capacity) -> bool:
        """Assign ``job`` to ``target``'s worker (commit, event, ``job.assign``)."""
        return self._assign(job, target)

    def _steal(self) -> None:
        """Free slots the pass left empty take back attempts waiting elsewhere."""
        if self.config.prefetch <= 0:
            return
        idle = self._capacities()
        if idle:
            steal_pass(self, idle)

    def pass_caps(self) -> list[Capacity]:
        """This pass's capacities, full workers too (coordinator/job_replicas.py)."""
        return self._pass_caps

    @staticmethod
    def _place(job: JobRecord, free: list[Capacity], *,
               plain: bool = False) -> Capacity | None:
        if not plain and (job.replicas > 1 or job.quorum > 1) and free and free[0].scheduler:
            return place_replica(free[0].scheduler, job, free)  # coordinator/job_replicas.py
        best: Capacity | None = None
        best_key = (0, 0)
        score = locality_score(job)  # None for a job without inputs
        for cap in free:
            need = cap.slots_for(job)
            if need > cap.free or need > max(cap.worker.slots, 1):
                continue
            if not cap.fits_gpus(job):
                continue
            if requirement_mismatch(cap.worker, job.spec) is not None:
                continue
            # of those that fit: the one caching most of the job's inputs, then the most
            # free slots (coordinator/job_locality.py)
            key = (score(cap.worker) if score else 0, cap.free)
            if best is None or key > best_key:
                best, best_key = cap, key
        return best

    def _assign(self, job: JobRecord, target: Capacity) -> bool:
        wid = target.worker.id
        if job_deps.input_refs(job.spec):  # futures as inputs: now data refs (job_deps)
            resolved, held = job_deps.resolve_inputs(self.store, job, self._clock())
            self.announce(held)
            if resolved is None:
                return False
            job = resolved
        try:  # a binaries app: this worker's binary, placed executable (job_apps.py)
            binary = job_apps.app_input(job.spec, target.worker.caps)
        except Unresolvable as err:
            log.warning("job %s not assigned to %s: %s", job.id, wid, err)
            return False
        made = self.store.assign_job(job.id, wid, now=self._clock())
        if made is None:
            return False
        attempt, change = made
        self.announce([change])
        if change.state is JobState.QUEUED:  # a replicated job wants more replicas placed
            self.poke()
        files = [*(job.spec.get("inputs") or ()), *([binary] if binary else [])]
        hashes = [i["sha256"] for i in files]
        stdin = job.spec.get("stdin")
        wanted = [*hashes, *([stdin] if stdin else [])]
        sizes = self.store.object_sizes(wanted) if wanted else {}  # most jobs read none
        body = JobAssign(
            attempt=attempt.id, job=job.id, owner=job.owner, spec=job.spec,
            inputs=[{"name": i["name"], "sha256": i["sha256"], "size": sizes.get(i["sha256"], 0),
                     **({"exec": True} if i.get("exec") else {})} for i in files],
            stdin={"sha256": stdin, "size": sizes.get(stdin, 0)} if stdin else None,
            lease_s=self.config.lease_s)
        acks = self._acks
        if acks is None:  # (stopping; the ack deadline requeues it)
            return True
        carry = self._carry
        if carry is not None and len(carry) < ASSIGN_IN_ANSWER_MAX:
            size = len(dumps(body.to_dict())) + ENVELOPE_BYTES
            if self._carry_bytes + size <= ASSIGN_IN_ANSWER_BYTES:
                env = acks.carried(attempt, body)
                if env is not None:
                    carry.append(to_wire(env))
                    self._carry_bytes += size
                    self.carried += 1
                return True
        acks.send(attempt, body)
        return True

    # -- for coordinator/assign_acks.py ----------------------------------------------------

    def reported(self, aid: str) -> None:
        """The attempt's report was accepted: it acknowledged the assignment as well."""
        acks = self._acks
        if acks is not None:  # (None: stopping)
            acks.reported(aid)

    def ack_deadline_s(self) -> float:
        return self.config.assign_ack_s

    def unanswered(self, attempt: AttemptRecord) -> None:
        """No ok within the deadline: offered elsewhere, and the worker told to stop it."""
        wid = attempt.worker_id
        self.end(attempt, AttemptKind.LEASE_EXPIRED,
                 f"worker {wid} did not acknowledge it within {self.config.assign_ack_s:g}s")
        self.kill(attempt.id, wid, "not acknowledged in time")

    def refused(self, attempt: AttemptRecord, error: Error) -> None:
        wid = attempt.worker_id
        if error.code == "busy":
            # Our count of its free slots was wrong (it still runs an attempt we
            # wrote off, e.g. after a false loss): not the job's failure, nor a
            # system failure to charge; offer the worker nothing until it heartbeats.
            self._refused[wid] = self._clock()
            changes = self.store.end_attempt(
                attempt.id, AttemptKind.LEASE_EXPIRED, now=self._clock(), spend=False,
                error=f"worker {wid} had no free slot: {error.message}")
            self.announce(changes)
            self.poke()
            return
        self.end(attempt, AttemptKind.LEASE_EXPIRED,
                 f"worker {wid} refused it: {error.message}")
