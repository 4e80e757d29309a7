"""Which worker meets a request's requirements, and which to offer first.

``reserve`` with ``any`` (cpus, memory, os/arch, tags, executor, image) takes the free
online workers that match, least loaded per CPU first; a reservation naming an image
skips the workers whose owner lets them run only their own image (another would fail
to open there). Batch scheduling will match jobs' requirements with the same rules.
"""

from __future__ import annotations

from typing import Any

from coordinator import gpu_capacity
from coordinator.handling import Refusal
from coordinator.reservation_state import WorkerNotReservable
from coordinator.store import Store, WorkerRecord
from coordinator.store.apps import image_refusal
from coordinator.worker_state import WorkerState


def candidates(store: Store, worker: str | None, requirements: dict[str, Any],
               image: str | None) -> list[WorkerRecord]:
    """The named ``worker`` (checked), or the free online workers matching, least loaded
    first. Refuses (``Refusal``, ``WorkerNotReservable``) when there is none."""
    if worker is not None:
        record = store.get_worker(worker)
        if record is None:
            raise Refusal("not_found", f"no worker with id or name {worker!r}")
        if record.state != WorkerState.ONLINE:
            raise WorkerNotReservable(record.id, record.state.value)
        why = mismatch(record, requirements, image)
        if why:
            raise Refusal("conflict", f"worker {record.id} does not match: {why}")
        return [record]
    online = store.list_workers(
        state=WorkerState.ONLINE, tags=requirements.get("tags") or [],
        min_cpus=requirements.get("min_cpus"),
        min_memory_bytes=requirements.get("min_memory_bytes"),
    )
    reserved = store.reserved_worker_ids()
    matching = [(index, w) for index, w in enumerate(online)
                if w.id not in reserved and not mismatch(w, requirements, image)]
    if not matching:
        raise Refusal("not_found", "no worker is online, free and matches "
                      f"{describe(requirements, image)}")
    matching.sort(key=lambda item: (load_per_cpu(item[1]), item[0]))
    return [w for _, w in matching]


def choose_executor(worker: WorkerRecord, requirements: dict[str, Any],
                    image: str | None) -> str | None:
    """The executor asked for (docker when an image is), else the worker's first."""
    wanted = requirements.get("executor") or ("docker" if image else None)
    if wanted:
        return str(wanted)
    names = [e for e in worker.executors if isinstance(e, str)]
    return names[0] if names else None


def mismatch(worker: WorkerRecord, req: dict[str, Any], image: str | None) -> str | None:
    """Why ``worker`` does not meet the requirements, or None when it does."""
    executors = {e for e in worker.executors if isinstance(e, str)}
    min_cpus = req.get("min_cpus")
    if min_cpus is not None and worker.cpus < min_cpus:
        return f"it has {worker.cpus} CPUs, {min_cpus} wanted"
    min_memory = req.get("min_memory_bytes")
    if min_memory is not None and worker.memory_bytes < min_memory:
        return f"it has {worker.memory_bytes} bytes of memory, {min_memory} wanted"
    missing = sorted(set(req.get("tags") or []) - set(worker.tags))
    if missing:
        return f"it lacks tag(s) {', '.join(missing)}"
    for field in ("os", "arch"):
        wanted = req.get(field)
        have = getattr(worker, field)
        if wanted and wanted.casefold() != have.casefold():
            return f"its {field} is {have or 'unknown'}, {wanted} wanted"
    executor = req.get("executor") or ("docker" if image else None)
    if executor and executor not in executors:
        return f"it has no {executor} executor"
    wanted_image = req.get("image")
    if wanted_image:
        docker = worker.caps.get("docker")
        images = docker.get("images") if isinstance(docker, dict) else None
        if not isinstance(images, list) or wanted_image not in images:
            return f"it does not have image {wanted_image}"
    refused = image_refusal(worker.caps, image) if image else None  # the session's image
    if refused:
        return refused
    return gpu_capacity.gpu_mismatch(worker.caps, gpu_capacity.requirements_ask(req))


def describe(req: dict[str, Any], image: str | None) -> str:
    """The requirements in a refusal's words: ``min_cpus=4 tags=gpu,linux``."""
    parts = [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in sorted(req.items())
             if v not in (None, [], "")]
    if image:
        parts.append(f"image={image} (docker)")
    return " ".join(parts) if parts else "(no requirements)"


def load_per_cpu(worker: WorkerRecord) -> float:
    """Load per CPU from the last heartbeat; unknown counts as idle."""
    load = worker.last_metrics.get("load1")
    if isinstance(load, (int, float)) and not isinstance(load, bool):
        return float(load) / max(worker.cpus, 1)
    return 0.0
