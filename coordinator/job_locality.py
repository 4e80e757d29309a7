"""Input locality: among the workers that fit a job, prefer one that already caches its
inputs (docs/jobs.md, "Fair share and locality").

Where the knowledge comes from: the worker itself. Its input cache (worker/input_cache.py)
advertises its most recently used hashes in its caps, ``shared.data`` as
``sha256:<hex>`` (256 entries at most, bounded by the caps schema, republished at most
every 10 s after new fetches). That is chosen over a coordinator-side memory of the
inputs it assigned to each worker because it is the truth: it follows evictions, a
wiped cache and restarts of either side, costs no new wire field and no memory that
grows with the attempts; the price is that a fetch shows up a few seconds late, which
only makes the preference miss, never wrong.

Cost: a worker's caps are decoded once per change by the store (``schedulable_workers``);
the set of hashes is built here once per caps document (kept with the document itself,
so a new one is never mistaken for it), so a pass costs one set lookup per (job input,
fitting worker), and nothing for jobs without inputs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from coordinator.store import WorkerRecord
from coordinator.store.job_records import JobRecord

PREFIX = "sha256:"
_CACHE_MAX = 4096  # workers whose hash sets are kept (more: rebuilt when met again)

_lock = threading.Lock()
_sets: dict[str, tuple[Any, frozenset[str]]] = {}  # worker id -> (its caps, their hashes)


def input_hashes(spec: dict[str, Any]) -> list[str]:
    """The data objects a job reads: its inputs' hashes and its stdin."""
    hashes = [str(i.get("sha256")) for i in spec.get("inputs") or () if isinstance(i, dict)]
    if isinstance(spec.get("stdin"), str):
        hashes.append(spec["stdin"])
    return hashes


def worker_hashes(worker: WorkerRecord) -> frozenset[str]:
    """The hashes ``worker`` says its input cache holds (its caps' ``shared.data``)."""
    caps = worker.caps
    with _lock:
        known = _sets.get(worker.id)
        if known is not None and known[0] is caps:
            return known[1]
    shared = caps.get("shared") if isinstance(caps, dict) else None
    data = shared.get("data") if isinstance(shared, dict) else None
    hashes = frozenset(item[len(PREFIX):] for item in data or ()
                       if isinstance(item, str) and item.startswith(PREFIX))
    with _lock:
        if len(_sets) >= _CACHE_MAX:
            _sets.clear()
        _sets[worker.id] = (caps, hashes)
    return hashes


def locality_score(job: JobRecord) -> Callable[[WorkerRecord], int] | None:
    """A function counting how many of ``job``'s inputs a worker caches; None for a job
    without inputs (the scheduler then compares free slots only)."""
    spec = job.spec
    if not spec.get("inputs") and not spec.get("stdin"):
        return None
    hashes = input_hashes(spec)

    def score(worker: WorkerRecord) -> int:
        held = worker_hashes(worker)
        return sum(1 for sha in hashes if sha in held) if held else 0

    return score
