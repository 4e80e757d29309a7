"""Fair share between principals (docs/jobs.md, "Fair share and locality").

Instantaneous fair share, as HTCondor's negotiator orders submitters: in each pass the
free slots go, one job at a time, to the principal whose (live attempts + jobs assigned
in this pass) / weight is lowest (ties: the one served longest ago, so a single free
slot goes round), taking that principal's own queue head in its own
priority then submission order. A principal with 10,000 queued jobs therefore gets its
weight's part of the slots, and one with 10 gets its part too, from its first job on;
priorities only order a principal's own jobs. Weights are ``[jobs] shares`` (default 1).

Cost: the owners with schedulable work come from a cached list (``store.queued_owners``,
one index probe per owner, refreshed once per ``pass_s``; a submit, a requeue or a
release adds its owner at once); each owner's head is one range of the version-9 index
``(state, waiting, owner, rank, submitted_at, id)``, read lazily, a page at a time, only
for the owners the pass reaches (the first page of the owners first in line in one
statement); the live attempts per owner are one grouped read of the
live attempts (bounded by the grid's slots). With a single owner queued the scheduler
keeps its one-walk head read (``applies`` is false), so that case costs what it did.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from broker.config import JobsConfig
from coordinator.store.job_records import JobChange, JobRecord

if TYPE_CHECKING:
    from coordinator.scheduler import Capacity, JobScheduler
    from coordinator.store import Store

MAX_PAGES = 4  # pages of one owner's queue read in a pass when its head fits no free worker
SUMMARY_ROWS = 500  # principals in one jobs.summary.reply (the busiest first)
RECENT_S = 3600.0  # "completed"/"failed" in the summary: ended this recently


class FairShare:
    """The fair-share state of one scheduler: weights, and the cached owners with queued
    work. ``match`` runs on the scheduler's thread; ``note`` from any thread."""

    def __init__(self, store: Store, config: JobsConfig, clock: Callable[[], float]) -> None:
        self.store = store
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._owners: list[str] = []
        self._owners_at = -math.inf
        self._noted: set[str] = set()
        self._served: dict[str, int] = {}  # owner -> the turn it last got a slot at
        self._turn = 0

    def weight(self, owner: str) -> float:
        return float(self.config.shares.get(owner, 1.0))

    def note(self, owners: Iterable[str]) -> None:
        """These principals may have queued work now (a submit, a requeue, a release)."""
        with self._lock:
            self._noted.update(owners)

    def note_changes(self, changes: Iterable[JobChange]) -> None:
        """``announce``'s hook: a job queued again, or one that completed (its children
        may be schedulable now), names an owner that may have queued work."""
        self.note(c.owner for c in changes if c.state.value in ("queued", "completed"))

    def owners(self) -> list[str]:
        """Owners with schedulable work (cached; see the module docstring)."""
        now = self._clock()
        with self._lock:
            noted, self._noted = self._noted, set()
            stale = now - self._owners_at >= max(self.config.pass_s, 0.05)
        if stale:
            owners = set(self.store.queued_owners())
            self._owners_at = now
        else:
            owners = set(self._owners)
        self._owners = sorted(owners | noted)
        return self._owners

    def _drop(self, owner: str) -> None:
        """``owner`` has no schedulable job left: not read again until noted."""
        self._owners = [o for o in self._owners if o != owner]

    def applies(self) -> bool:
        """Fair share orders this pass: it is on and two or more owners have work."""
        return self.config.fair_share and len(self.owners()) > 1

    def match(self, sched: JobScheduler, free: list[Capacity], total: int) -> tuple[int, int]:
        """Fill up to ``total`` free slots in fair-share order (the module docstring);
        returns (jobs assigned, slots left)."""
        owners = list(self._owners)
        usage: dict[str, float] = {o: float(n) for o, n in
                                   self.store.live_attempts_by_owner().items()}
        per_slot = max(1, self.config.candidates_per_slot)
        page = max(per_slot, math.ceil(total / max(1, len(owners))) * per_slot)
        if len(self._served) > 2 * len(owners) + 1000:
            self._served = {o: t for o, t in self._served.items() if o in set(owners)}
        served = self._served
        heap = [(usage.get(o, 0.0) / self.weight(o), served.get(o, 0), o) for o in owners]
        heapq.heapify(heap)
        skipped: dict[str, int] = {}
        pages: dict[str, int] = {}
        done: set[str] = set()  # owners whose queue this pass has read to its end
        queues: dict[str, deque[JobRecord]] = {}
        # The owners first in line (the pass may serve as many owners as it has slots)
        # have their first page read in one statement, not one round trip each.
        first = [o for _, _, o in heapq.nsmallest(min(total, len(heap)), heap)]
        for owner, jobs in self.store.queued_heads_of(first, page).items():
            queues[owner] = deque(jobs)
            pages[owner] = 1
            if len(jobs) < page:
                done.add(owner)
            if not jobs:
                self._drop(owner)  # nothing queued any more: not read again until noted
        assigned = 0
        while heap and total > 0:
            owner = heap[0][2]
            queue = queues.get(owner)
            if not queue:
                if owner in done or pages.get(owner, 0) >= MAX_PAGES:
                    heapq.heappop(heap)
                    continue
                jobs = self.store.queued_jobs_of(owner, page, skipped.get(owner, 0))
                pages[owner] = pages.get(owner, 0) + 1
                if len(jobs) < page:
                    done.add(owner)
                if not jobs:
                    if pages[owner] == 1 and not skipped.get(owner):
                        self._drop(owner)
                    heapq.heappop(heap)
                    continue
                queue = queues[owner] = deque(jobs)
            job = queue.popleft()
            target = sched._place(job, free)
            if target is None:
                skipped[owner] = skipped.get(owner, 0) + 1
                continue
            if sched._assign(job, target):
                total -= target.take(job)
                assigned += 1
                usage[owner] = usage.get(owner, 0.0) + 1
                self._turn += 1
                served[owner] = self._turn
                heapq.heapreplace(heap, (usage[owner] / self.weight(owner), self._turn, owner))
                free[:] = [c for c in free if c.free > 0]
        return assigned, total

    # -- what users see: why, jobs.summary ----------------------------------------------------

    def describe(self, owner: str) -> str:
        """One line for ``jobs.why``: the owner's slots and weight against the others'
        (named only in totals: a client learns no other principal's name)."""
        usage = self.store.live_attempts_by_owner()
        active = set(self.owners()) | set(usage) | {owner}
        weights = {o: self.weight(o) for o in active}
        mine = usage.get(owner, 0)
        target = weights[owner] / sum(weights.values())
        others = active - {owner}
        text = (f"{owner} holds {mine} slot(s) for weight {weights[owner]:g} "
                f"(target {target:.0%} of the busy slots)")
        if others:
            text += (f"; {len(others)} other principal(s) with work hold "
                     f"{sum(usage.get(o, 0) for o in others)} for weight "
                     f"{sum(weights[o] for o in others):g} in all")
        if not self.config.fair_share:
            text += " (fair share is off: one queue by priority)"
        return text


def summary_rows(store: Store, fair: FairShare, *, principal: str | None
                 ) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
    """``jobs.summary.reply``'s rows: per principal (only ``principal``'s own when it is
    given: a client's view), the totals of every principal, and whether rows were left
    out (``SUMMARY_ROWS``, the busiest first)."""
    counts = store.job_counts_by_owner(fair._clock() - RECENT_S)
    usage = store.live_attempts_by_owner()
    for owner, n in usage.items():  # running attempts of jobs of any state
        counts.setdefault(owner, {})["slots"] = n
    busy = sum(usage.values())
    active = {o for o, c in counts.items() if c.get("queued") or c.get("slots")}
    weights_active = sum(fair.weight(o) for o in active) or 1.0
    keys = ("queued", "waiting", "running", "held", "completed", "failed")

    def row(owner: str, c: dict[str, int]) -> dict[str, Any]:
        return {"principal": owner, **{k: c.get(k, 0) for k in keys},
                "slots": c.get("slots", 0), "weight": fair.weight(owner),
                "busy_share": round(c.get("slots", 0) / busy, 4) if busy else 0.0,
                "target_share": round(fair.weight(owner) / weights_active, 4)
                if owner in active else 0.0}

    totals: dict[str, Any] = {k: sum(c.get(k, 0) for c in counts.values()) for k in keys}
    totals.update(slots=busy, owners=len(counts), active=len(active))
    owners = sorted(counts, key=lambda o: (-counts[o].get("slots", 0),
                                           -counts[o].get("queued", 0), o))
    if principal is not None:
        owners = [o for o in owners if o == principal] or [principal]
    rows = [row(o, counts.get(o, {})) for o in owners[:SUMMARY_ROWS]]
    return rows, totals, len(owners) > SUMMARY_ROWS
