"""AttemptLaunch: from an accepted attempt to its running command (docs/jobs.md,
"Running jobs (worker)", steps 1-2), for worker/job_runner.py.

The session is opened in the executor the attempt names (its work dir, the spec's cpus
and memory as limits, the GPUs it holds, an image_archive app's image loaded first), the
inputs and stdin are copied in from the input cache, and ``sh -c COMMAND`` starts with
``XCLOUD_JOB_ID``, ``XCLOUD_JOB_INDEX`` and ``XCLOUD_ATTEMPT_ID`` in its environment and
stdout and stderr captured to capped files. What could not run comes back as its outcome
(``input_failed``, or ``cancelled`` when a kill came first); the runner watches what did.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas.outcome import ERROR_MAX
from worker.executors.base import Executor, ExecutorError, Limits, SessionHandle, TaskSpec
from worker.image_archives import ImageArchiveError, ImageArchives, archive_of
from worker.input_cache import CacheError, InputCache
from worker.job_attempts import Attempt, AttemptRecord, AttemptStore
from worker.job_files import STDIN_NAME, Captures, JobFileError, place
from worker.job_gpus import GpuAllocator, GpuSessionSpec, device_ids, gpu_env

Outcome = tuple[dict[str, Any], "Captures | None"]  # an attempt's result, its captures


class AttemptLaunch:
    """Opens an attempt's session and starts its command (see the module docstring)."""

    def __init__(self, store: AttemptStore, cache: InputCache, archives: ImageArchives,
                 gpus: GpuAllocator, output_cap: int,
                 save: Callable[[AttemptRecord], None]) -> None:
        self.store = store
        self.cache = cache
        self.archives = archives
        self.gpus = gpus
        self.output_cap = output_cap
        self.save = save  # the record, once it names its session (a restart closes it)

    def launch(self, attempt: Attempt, executor: Executor) -> Outcome | None:
        """None once the command runs (``attempt.task`` is set), else the (result,
        captures) of an attempt that could not run."""
        record = attempt.record
        spec = record.spec
        attempt.executor = executor
        workdir = self.store.workdir(record.attempt)
        resources = spec.get("resources") or {}
        requirements = spec.get("requirements") or {}
        limits = Limits(cpus=float(resources["cpus"]) if resources.get("cpus") else None,
                        memory_bytes=resources.get("memory_bytes"))
        image = requirements.get("image")
        archive = archive_of(spec)  # an image_archive app: the image its archive loads as
        if archive is not None:
            try:
                image = self.archives.image(archive)
            except ImageArchiveError as err:
                return {"kind": "input_failed", "error": str(err)[:ERROR_MAX]}, None
        handle = executor.open_session(GpuSessionSpec(
            session_id=record.attempt, workdir=workdir, owner=record.owner, limits=limits,
            image=image, carry_cwd=False,  # one command: no `cd` to carry to a next
            gpu_devices=tuple(device_ids(self.gpus.held(record.attempt)))))
        attempt.handle = handle
        record.handle = handle.to_dict()
        self.save(record)
        return self._in_session(attempt, executor, handle, workdir)

    def _in_session(self, attempt: Attempt, executor: Executor, handle: SessionHandle,
                    workdir: Path) -> Outcome | None:
        record = attempt.record
        spec = record.spec
        command = str(spec["command"])
        try:
            for item in record.inputs:
                with self.cache.use(str(item["sha256"])) as source:
                    place(source, workdir, str(item["name"]),
                          executable=item.get("exec") is True)
            if record.stdin:
                with self.cache.use(str(record.stdin["sha256"])) as source:
                    place(source, workdir, STDIN_NAME)
                command = f"exec <{shlex.quote(STDIN_NAME)}\n{command}"
        except (CacheError, JobFileError, OSError) as err:
            return {"kind": "input_failed", "error": str(err)[:ERROR_MAX]}, None
        env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
        env.update({"XCLOUD_JOB_ID": record.job, "XCLOUD_ATTEMPT_ID": record.attempt,
                    "XCLOUD_JOB_INDEX": str(int(spec.get("index") or 0))})
        if (held := self.gpus.held(record.attempt)) and executor.capabilities().gpus == "env":
            env.update(gpu_env(held))  # else the session has them (GpuSessionSpec)
        captures = Captures(self.store.path(record.attempt), self.output_cap)
        with attempt.lock:
            if attempt.kill_reason is not None:
                captures.close()
                return {"kind": "cancelled", "error": attempt.kill_reason[:ERROR_MAX]}, captures
            try:
                task = executor.start(TaskSpec(task_id=record.attempt, command=command,
                                               session=handle, env=env), captures.feed)
            except ExecutorError as err:
                captures.close()
                return {"kind": "input_failed",
                        "error": f"cannot start the command: {err}"[:ERROR_MAX]}, None
            attempt.task = task
        attempt.captures, attempt.workdir = captures, workdir
        record.started_at = task.started_at or time.time()
        record.phase = "running"  # in memory only: a restart treats it as assigned
        return None
