"""Whether a worker meets a job's requirements, one predicate per requirement.

The scheduler (``scheduler.requirement_mismatch``), ``jobs.why`` (coordinator/job_why.py)
and the unmatchable check at submit and later (coordinator/job_unmatchable.py) all use
these predicates, so what ``why`` reports is exactly what the scheduler decides. Each
predicate returns why ``worker`` fails that one requirement, or None; the reasons and
their order are those of ``coordinator.matching.mismatch`` (reservations), which jobs
shared before: worker, CPUs and memory minimums, tags, os, arch, executor, image, whether
the worker's owner lets it run that image, GPU name; then the app a job runs
(coordinator/job_apps.py). Capacity (cpus and memory per slot, GPUs) is a separate group:
the scheduler checks it per pass against free slots; here only whether the worker could
*ever* hold the job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from coordinator import gpu_capacity
from coordinator.job_apps import app_of, app_reason
from coordinator.store import WorkerRecord
from coordinator.store.apps import image_refusal

Check = Callable[[WorkerRecord], str | None]


def _requirements(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    req = spec.get("requirements") if isinstance(spec, Mapping) else None
    return req if isinstance(req, Mapping) else {}


def _resources(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    res = spec.get("resources") if isinstance(spec, Mapping) else None
    return res if isinstance(res, Mapping) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


# -- one predicate per requirement ------------------------------------------------------


def worker_reason(worker: WorkerRecord, wanted: str | None) -> str | None:
    if wanted and wanted not in (worker.id, worker.name):
        return f"the job asks for worker {wanted}"
    return None


def min_cpus_reason(worker: WorkerRecord, min_cpus: int | None) -> str | None:
    if min_cpus is not None and worker.cpus < min_cpus:
        return f"it has {worker.cpus} CPUs, {min_cpus} wanted"
    return None


def min_memory_reason(worker: WorkerRecord, min_memory: int | None) -> str | None:
    if min_memory is not None and worker.memory_bytes < min_memory:
        return f"it has {worker.memory_bytes} bytes of memory, {min_memory} wanted"
    return None


def tags_reason(worker: WorkerRecord, tags: list[str]) -> str | None:
    missing = sorted(set(tags) - set(worker.tags))
    if missing:
        return f"it lacks tag(s) {', '.join(missing)}"
    return None


def host_reason(worker: WorkerRecord, field: str, wanted: str | None) -> str | None:
    """``field`` is ``os`` or ``arch``; compared without case."""
    have = str(getattr(worker, field) or "")
    if wanted and wanted.casefold() != have.casefold():
        return f"its {field} is {have or 'unknown'}, {wanted} wanted"
    return None


def executor_reason(worker: WorkerRecord, executor: str | None, image: str | None
                    ) -> str | None:
    """An image asks for docker unless the job names its executor."""
    wanted = executor or ("docker" if image else None)
    if wanted and wanted not in {e for e in worker.executors if isinstance(e, str)}:
        return f"it has no {wanted} executor"
    return None


def image_reason(worker: WorkerRecord, image: str | None) -> str | None:
    """A worker that lists no images pulls what it lacks: it meets any image."""
    if not image:
        return None
    docker = worker.caps.get("docker")
    images = docker.get("images") if isinstance(docker, dict) else None
    if isinstance(images, list) and image not in images:
        return f"it does not have image {image}"
    return None


def image_policy_reason(worker: WorkerRecord, image: str | None, executor: str | None
                        ) -> str | None:
    """A worker whose owner turned image override off runs only its own image: a docker
    job naming another would fail there (``store.apps.image_refusal``); the process
    executor ignores the image."""
    if not image or executor not in (None, "docker"):
        return None
    return image_refusal(worker.caps, image)


def gpu_name_reason(worker: WorkerRecord, req: Mapping[str, Any]) -> str | None:
    return gpu_capacity.gpu_mismatch(worker.caps, gpu_capacity.requirements_ask(req))


def cpus_reason(worker: WorkerRecord, cpus: int) -> str | None:
    """Whether the job's CPUs fit in the worker's slots at all (scheduler.Capacity)."""
    if cpus > max(worker.cpus, 1):
        return f"it has {worker.cpus} CPUs, {cpus} wanted"
    return None


def memory_reason(worker: WorkerRecord, memory: int) -> str | None:
    """A worker that does not say its memory holds any job (scheduler.Capacity)."""
    if memory and worker.memory_bytes and memory > worker.memory_bytes:
        return f"it has {worker.memory_bytes} bytes of memory, {memory} wanted"
    return None


def gpus_reason(worker: WorkerRecord, spec: Mapping[str, Any]) -> str | None:
    """The job's ``resources.gpus`` (and GPU memory/name) against the worker's GPUs."""
    return gpu_capacity.gpu_mismatch(worker.caps, gpu_capacity.job_ask(spec))


# -- the scheduler's check ----------------------------------------------------------------


def requirement_mismatch(worker: WorkerRecord, spec: Mapping[str, Any]) -> str | None:
    """Why ``worker`` cannot run a job with this spec's requirements, or None (the
    requirements only: capacity is the scheduler's per-pass concern)."""
    req = _requirements(spec)
    image = _str(req.get("image"))
    tags = req.get("tags")
    return (worker_reason(worker, _str(req.get("worker")))
            or min_cpus_reason(worker, _int(req.get("min_cpus")))
            or min_memory_reason(worker, _int(req.get("min_memory_bytes")))
            or tags_reason(worker, [t for t in tags if isinstance(t, str)]
                           if isinstance(tags, list) else [])
            or host_reason(worker, "os", _str(req.get("os")))
            or host_reason(worker, "arch", _str(req.get("arch")))
            or executor_reason(worker, _str(req.get("executor")), image)
            or image_reason(worker, image)
            or image_policy_reason(worker, image, _str(req.get("executor")))
            or gpu_name_reason(worker, req)
            or app_reason(worker.caps, app_of(spec)))


def job_cpus(spec: Mapping[str, Any]) -> int:
    """resources.cpus with its default (as ``store.job_records.spec_columns``)."""
    return _int(_resources(spec).get("cpus")) or 1


def job_memory(spec: Mapping[str, Any]) -> int:
    return _int(_resources(spec).get("memory_bytes")) or 0


def never_fits(worker: WorkerRecord, spec: Mapping[str, Any]) -> str | None:
    """Why ``worker`` could never run the job, whatever it runs now, or None."""
    return (requirement_mismatch(worker, spec)
            or cpus_reason(worker, job_cpus(spec))
            or memory_reason(worker, job_memory(spec))
            or gpus_reason(worker, spec))


# -- the requirements one by one, for jobs.why and the unmatchable check --------------------


@dataclass(frozen=True, slots=True)
class Requirement:
    """One requirement of a job: its name, the value asked, its predicate, and how to
    say that no worker meets it (``no worker has arch arm64``)."""

    name: str
    wanted: str
    check: Check
    nobody: str


def requirements_of(spec: Mapping[str, Any]) -> list[Requirement]:
    """The job's requirements that it asks for, in the scheduler's order; each tag is
    its own. Capacity (cpus, memory, gpus) comes last."""
    req = _requirements(spec)
    out: list[Requirement] = []
    wanted_worker = _str(req.get("worker"))
    if wanted_worker:
        out.append(Requirement("worker", wanted_worker,
                               lambda w: worker_reason(w, wanted_worker),
                               f"no worker is {wanted_worker}"))
    tags = req.get("tags")
    for tag in dict.fromkeys(t for t in (tags if isinstance(tags, list) else [])
                             if isinstance(t, str)):
        out.append(Requirement("tag", tag, partial(tags_reason, tags=[tag]),
                               f"no worker has tag {tag}"))
    for field in ("os", "arch"):
        value = _str(req.get(field))
        if value:
            out.append(Requirement(field, value,
                                   partial(host_reason, field=field, wanted=value),
                                   f"no worker has {field} {value}"))
    image = _str(req.get("image"))
    executor = _str(req.get("executor")) or ("docker" if image else None)
    if executor:
        out.append(Requirement("executor", executor,
                               lambda w: executor_reason(w, executor, None),
                               f"no worker has the {executor} executor"))
    if image:
        out.append(Requirement("image", image, lambda w: image_reason(w, image),
                               f"no worker has image {image}"))
    if image and executor == "docker":
        out.append(Requirement("image", f"{image} allowed by the owner",  # its own row
                               lambda w: image_policy_reason(w, image, executor),
                               f"no worker may run image {image}: their owners let them "
                               "run only their own image"))
    if gpu_capacity.requirements_ask(req).filtered:
        name = _str(req.get("gpu_name")) or ""
        out.append(Requirement("gpu_name", name, lambda w: gpu_name_reason(w, req),
                               f"no worker has a GPU named like {name}"))
    app = app_of(spec)  # the app's snapshot (coordinator/job_apps.py), read once
    if app is not None:
        label = f"{app.name} {app.version}"
        platforms = ", ".join(b.platform for b in app.binaries)
        out.append(Requirement("app", label, lambda w: app_reason(w.caps, app),
                               f"no worker can run app {label}" + (
                                   f": it has binaries for {platforms} only"
                                   if platforms else "")))
    cpus, memory = job_cpus(spec), job_memory(spec)
    out.append(Requirement("cpus", str(cpus), lambda w: cpus_reason(w, cpus),
                           f"no worker has {cpus} CPUs"))
    if memory:
        out.append(Requirement("memory", str(memory), lambda w: memory_reason(w, memory),
                               f"no worker has {memory} bytes of memory"))
    ask = gpu_capacity.job_ask(spec)
    if ask.count:
        out.append(Requirement("gpus", str(ask.count), lambda w: gpus_reason(w, spec),
                               f"no worker has {ask.describe()}"))
    return out


def why_nobody(workers: list[WorkerRecord], spec: Mapping[str, Any]) -> str | None:
    """None when one of ``workers`` could run the job some day; else the first
    requirement none of them meets, or that none meets them all at once."""
    if any(never_fits(w, spec) is None for w in workers):
        return None
    if not workers:
        return "no worker is known"
    for requirement in requirements_of(spec):
        if all(requirement.check(w) is not None for w in workers):
            return requirement.nobody
    return "no worker meets all of its requirements at once"
