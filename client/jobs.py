"""Batch jobs in Python: ``grid.submit``, ``grid.executor()``, ``grid.jobs`` (docs/jobs.md).

    with Grid.connect() as grid:
        fut = grid.submit("wc -l data.txt", inputs={"data.txt": "./data.txt"},
                          outputs=["*.out"], wall="10m")
        result = fut.result()                 # a JobResult
        print(result.exit_code, result.stdout)  # stdout/stderr bytes fetched on first use
        with grid.executor(cpus=1) as ex:     # a concurrent.futures.Executor
            for r in ex.map("echo", range(10)):   # runs `echo 0` ... `echo 9`
                print(r.stdout)

The executor runs *shell commands* (a string, or an argv list that is quoted for you;
``map``'s arguments are appended to it), never Python callables: nothing is pickled or
shipped. Local input files are uploaded first through ``grid.data`` (each file once per
session), and a job's inputs can also be data refs, SHA-256 hashes, or other jobs'
outputs before they exist (``future.output(name)``: docs/jobs.md, "Futures as inputs").
Futures complete from the coordinator's ``job.event`` messages to this session's inbox, with a
``jobs.list`` poll (every ``POLL_S``) as the fallback for events missed while
disconnected. Cancelling a future cancels its job.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import re
import shlex
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.data import DataRef, is_sha256
from client.errors import ClientError, InvalidRequest
from client.job_follow import FollowRouter
from client.job_follow import follow as follow_job
from client.job_results import JobOutputRef, JobResult
from client.job_watch import JobWatch, WatchRouter
from client.reservation import Refused
from schemas.job_messages import (
    MAX_JOBS_PER_REQUEST,
    TERMINAL_JOB_STATES,
    JobEvent,
    JobsCancel,
    JobsHold,
    JobsList,
    JobsListReply,
    JobsRelease,
    JobsShow,
    JobsShowReply,
    JobsSubmit,
    JobsSubmitted,
    JobsWhy,
    JobsWhyReply,
)

if TYPE_CHECKING:
    from client.api import Grid

log = logging.getLogger(__name__)

POLL_S = 5.0
LOOSE_SHOW_MAX = 20  # jobs polled one by one (jobs.show); beyond, jobs.list pages
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

__all__ = ["JobExecutor", "JobFuture", "JobOutputRef", "JobResult", "JobStore"]

InputValue = str | os.PathLike[str] | DataRef
# an input may also be a job's future output (docs/jobs.md, "Futures as inputs")
JobInput = InputValue | JobOutputRef | cf.Future[Any]


def parse_size(text: str | int) -> int:
    """``4G``, ``512M``, ``1.5GiB``, or a number of bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise InvalidRequest(f"not a size: {text!r} (e.g. 512M, 4G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_duration(text: str | float) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d``."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise InvalidRequest(f"not a duration: {text!r} (e.g. 90s, 10m, 2h)")
    return float(match.group(1)) * _SECONDS[match.group(2).lower()]


def command_line(command: str | Sequence[Any], args: Sequence[Any] = ()) -> str:
    """A shell command line: a string as given, an argv list quoted; ``args`` appended
    (quoted). Anything callable is refused: jobs run commands, not Python functions."""
    if callable(command):
        raise TypeError("grid jobs run shell commands (a string or an argv list), not "
                        "Python callables")
    line = command if isinstance(command, str) else shlex.join(str(part) for part in command)
    if args:
        line = f"{line} {shlex.join(str(a) for a in args)}"
    if not line.strip():
        raise InvalidRequest("the command is empty")
    return line


def app_spec(command: str | Sequence[Any] | None, args: Sequence[Any], app: str | None,
             version: str | None, owner: str | None) -> dict[str, Any]:
    """The ``command`` or ``app`` (with ``args``) part of a JobSpec: exactly one of them."""
    if app is None:
        if command is None:
            raise InvalidRequest("give a command or an app")
        return {"command": command_line(command, args)}
    if command is not None:
        raise InvalidRequest("give a command or an app, not both")
    item: dict[str, Any] = {"name": str(app)}
    if version is not None:
        item["version"] = str(version)
    if owner is not None:
        item["owner"] = str(owner)
    return {"app": item, **({"args": [str(a) for a in args]} if args else {})}


def _input_item(name: str, value: Any, data: Callable[[InputValue], DataRef]
                ) -> dict[str, Any]:
    """One JobSpec input: a future output (``{name, job, output}``) or a data ref."""
    if isinstance(value, JobFuture):
        value = value.output("stdout")
    elif isinstance(value, cf.Future):
        raise InvalidRequest(f"input {name!r}: only job futures can be inputs")
    if isinstance(value, JobOutputRef):
        return {"name": name, "job": value.job, "output": value.output}
    return {"name": name, "sha256": data(value).sha256}


class JobFuture(cf.Future[JobResult]):
    """A job's future; ``cancel()`` cancels the job on the grid too."""

    def __init__(self, store: JobStore, job: str) -> None:
        super().__init__()
        self.job = job
        self._store = store
        self.cancelling = False  # a cancel is on its way: the job's end is not a result

    def cancel(self) -> bool:
        """Cancel the job on the grid; True when it was cancelled (False when it had
        ended already, or the grid refused). The job.event of the cancel may come back
        before the reply: meanwhile the future is kept from taking it as a result."""
        if self.done():
            return False
        self.cancelling = True
        try:
            counts = self._store.cancel([self.job])
        except ClientError as err:
            log.warning("cannot cancel job %s: %s", self.job, err)
            self.cancelling = False
            return False
        if not counts.get("changed"):  # it had ended: its result stands
            self.cancelling = False
            self._store.complete_soon(self.job)
            return False
        return super().cancel()

    def output(self, name: str = "stdout") -> JobOutputRef:
        """This job's output file ``name`` (or ``stdout``/``stderr``) as an input of
        another job, before this one has run: ``grid.submit(..., inputs={"in.txt":
        fut.output("out.txt")})``. Passing the future itself means its stdout."""
        return JobOutputRef(self.job, name)

    def __repr__(self) -> str:
        return f"<JobFuture {self.job} {self._state}>"


class JobStore:
    """``grid.jobs``: submit, list, show, wait, cancel/hold/release (module docstring)."""

    def __init__(self, grid: Grid, poll_s: float = POLL_S) -> None:
        self.grid = grid
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._futures: dict[str, JobFuture] = {}
        self._ended: set[str] = set()  # jobs whose terminal event arrived
        self._batch: dict[str, str] = {}  # job -> its batch, for the poll
        self._uploaded: dict[tuple[str, int, int], DataRef] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._follows: FollowRouter | None = None  # job.output routing (client/job_follow.py)
        self._watches: WatchRouter | None = None  # job.event to watches (client/job_watch.py)
        self.last_warnings: list[dict[str, str]] = []  # the last submit's (jobs.submitted)

    # -- submitting --------------------------------------------------------------------

    def spec(self, command: str | Sequence[Any] | None = None, *, args: Sequence[Any] = (),
             app: str | None = None, app_version: str | None = None,
             app_owner: str | None = None,
             inputs: Mapping[str, JobInput] | None = None,
             outputs: Sequence[str] = (), env: Mapping[str, str] | None = None,
             stdin: InputValue | None = None, cpus: int | None = None,
             memory: str | int | None = None, disk: str | int | None = None,
             wall: str | float | None = None, retries: int | None = None,
             system_retries: int | None = None, stop_exit_codes: Sequence[int] = (),
             priority: int | None = None, labels: Mapping[str, str] | None = None,
             tags: Sequence[str] = (), executor: str | None = None,
             image: str | None = None, worker: str | None = None,
             name: str | None = None, index: int | None = None, gpus: int | None = None,
             gpu_memory: str | int | None = None,
             gpu_name: str | None = None,
             after: Sequence[JobFuture | str] = (),
             after_policy: str | None = None, replicas: int | None = None,
             quorum: int | None = None, max_replica_attempts: int | None = None,
             adaptive_after: int | None = None) -> dict[str, Any]:
        """A JobSpec document (local input files are uploaded now). ``gpus``: GPUs the
        job needs, each with at least ``gpu_memory`` and a name containing ``gpu_name``
        (docs/gpus.md). ``after``: jobs (futures or ids) that must complete first;
        ``after_policy``: hold (default) or cancel this job if one of them fails
        (docs/jobs.md, "Dependencies"). ``inputs`` values: local files, data refs,
        SHA-256s, or other jobs' outputs (``future.output(name)``, or a future for its
        stdout), which also make this job wait for those jobs. ``replicas``, ``quorum``,
        ``max_replica_attempts``, ``adaptive_after``: docs/jobs.md, "Replicas and quorum".
        ``app`` (instead of ``command``): a registered application, at ``app_version``
        (default latest) of ``app_owner`` (default you); ``args`` are appended to what it
        runs (docs/jobs.md, "Applications as jobs")."""
        spec: dict[str, Any] = app_spec(command, args, app, app_version, app_owner)
        items = [_input_item(str(n), v, self._data) for n, v in (inputs or {}).items()]
        parents = [p.job if isinstance(p, JobFuture) else str(p) for p in after]
        parents += [str(i["job"]) for i in items if "job" in i]
        if parents:
            spec["after"] = list(dict.fromkeys(parents))
        if after_policy is not None:
            spec["after_policy"] = after_policy
        if env:
            spec["env"] = {str(k): str(v) for k, v in env.items()}
        if stdin is not None:
            spec["stdin"] = self._data(stdin).sha256
        if items:
            spec["inputs"] = items
        if outputs:
            spec["outputs"] = [str(o) for o in outputs]
        resources = {k: v for k, v in (
            ("cpus", cpus), ("memory_bytes", None if memory is None else parse_size(memory)),
            ("disk_bytes", None if disk is None else parse_size(disk)),
            ("gpus", gpus or None),
            ("gpu_memory_bytes", None if gpu_memory is None else parse_size(gpu_memory)),
        ) if v is not None}
        if resources:
            spec["resources"] = resources
        requirements: dict[str, Any] = {k: v for k, v in (
            ("executor", executor), ("image", image), ("worker", worker),
            ("gpu_name", gpu_name)) if v}
        if tags:
            requirements["tags"] = list(tags)
        if requirements:
            spec["requirements"] = requirements
        for key, value in (("wall_s", None if wall is None else parse_duration(wall)),
                           ("max_retries", retries), ("max_system_retries", system_retries),
                           ("priority", priority), ("name", name), ("index", index),
                           ("replicas", replicas), ("quorum", quorum),
                           ("max_replica_attempts", max_replica_attempts),
                           ("adaptive_after", adaptive_after)):
            if value is not None:
                spec[key] = value
        if stop_exit_codes:
            spec["stop_exit_codes"] = [int(c) for c in stop_exit_codes]
        if labels:
            spec["labels"] = {str(k): str(v) for k, v in labels.items()}
        return spec

    def _data(self, value: InputValue) -> DataRef:
        """A data ref for an input: a DataRef, a SHA-256, or a local file (uploaded once)."""
        if isinstance(value, DataRef):
            return value
        text = os.fspath(value)
        if isinstance(value, str) and is_sha256(value) and not Path(text).exists():
            return DataRef(sha256=value, size=0)
        path = Path(text)
        if not path.is_file():
            raise InvalidRequest(f"input {text!r} is neither a file nor a sha256")
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            found = self._uploaded.get(key)
        if found is None:
            found = self.grid.data.put(path)
            with self._lock:
                self._uploaded[key] = found
        return found

    def submit_specs(self, specs: Sequence[dict[str, Any]]) -> list[JobFuture]:
        """Submit JobSpec documents (in requests of at most 500); one future each."""
        futures: list[JobFuture] = []
        warnings: list[dict[str, str]] = []
        for start in range(0, len(specs), MAX_JOBS_PER_REQUEST):
            chunk = list(specs[start:start + MAX_JOBS_PER_REQUEST])
            reply: JobsSubmitted = self.grid.ask(JobsSubmit(jobs=chunk), what="submit jobs")
            warnings.extend(reply.warnings or ())
            for warning in reply.warnings or ():
                log.warning("job %s %s", warning.get("job"), warning.get("message"))
            self.last_warnings = warnings
            with self._lock:
                self._batch.update(dict.fromkeys(reply.ids, reply.batch))
            futures.extend(self._track(job) for job in reply.ids)
        return futures

    def submit(self, command: str | Sequence[Any] | None = None, *args: Any,
               **options: Any) -> JobFuture:
        """One job (options as ``spec``; ``app="NAME"`` and no command runs an app with
        ``args``); returns its future."""
        if command is None and "args" in options:
            args = (*args, *options.pop("args"))
        return self.submit_specs([self.spec(command, args=args, **options)])[0]

    def close(self) -> None:
        """The session closes: stop completing futures; those still pending fail."""
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        with self._lock:
            pending = list(self._futures.values())
            self._futures.clear()
        for fut in pending:
            with contextlib.suppress(cf.InvalidStateError):  # ended or cancelled meanwhile
                fut.set_exception(ClientError(f"job {fut.job}: the grid session closed "
                                              "before it ended"))

    # -- futures -----------------------------------------------------------------------

    def future(self, job: str) -> JobFuture:
        """The future of ``job`` (tracked from now on)."""
        return self._track(job)

    def _track(self, job: str) -> JobFuture:
        with self._lock:
            fut = self._futures.get(job)
            if fut is None:
                fut = self._futures[job] = JobFuture(self, job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="jobs-futures",
                                                daemon=True)
                self._thread.start()
        self._wake.set()
        return fut

    def complete_soon(self, job: str) -> None:
        """Look at ``job``'s end now (a cancel found it ended: its event may be past)."""
        with self._lock:
            if job in self._futures:
                self._ended.add(job)
        self._wake.set()

    def on_events(self, events: list[JobEvent]) -> None:
        """``job.event`` or ``job.events`` from the coordinator (the Grid routes them here,
        in their order)."""
        watches = self._watches
        if watches is not None:
            watches.on_inbox(events)
        ended = [e.job for e in events if e.state in TERMINAL_JOB_STATES]
        if not ended:
            return
        with self._lock:
            waited = [job for job in ended if job in self._futures]
            if not waited:
                return  # no future waits on them: no need to wake the completer thread
            self._ended.update(waited)
        self._wake.set()

    def _run(self) -> None:
        """Complete futures: at once on a terminal event, and by polling every poll_s."""
        closed = self.grid._closed
        while not closed.is_set():
            polled = not self._wake.wait(self.poll_s)
            self._wake.clear()
            with self._lock:
                pending = [j for j, f in self._futures.items() if not f.done()]
                ended = [j for j in self._ended if j in self._futures]
                self._ended.clear()
                for job, fut in list(self._futures.items()):
                    if fut.done():
                        del self._futures[job]
                        self._batch.pop(job, None)
            if not pending:
                continue
            try:
                if polled:
                    ended += self._poll_terminal(set(pending))
                for job in dict.fromkeys(ended):
                    self._complete(job)
            except ClientError as err:
                log.debug("job futures: %s (retrying)", err)

    def _poll_terminal(self, pending: set[str]) -> list[str]:
        """The pending jobs that ended: listed per batch (jobs submitted here), shown
        one by one (jobs tracked by id only)."""
        with self._lock:
            batches = {self._batch[j] for j in pending if j in self._batch}
            loose = [j for j in pending if j not in self._batch]
        done: list[str] = []
        for batch in sorted(batches):
            done += [str(j["id"]) for j in self.ls(batch=batch)
                     if j["id"] in pending and j["state"] in TERMINAL_JOB_STATES]
        if len(loose) > LOOSE_SHOW_MAX:  # many: one listing of all our jobs is cheaper
            states = {str(j["id"]): j["state"] for j in self.ls()}
            done += [j for j in loose if states.get(j) in TERMINAL_JOB_STATES]
            loose = [j for j in loose if j not in states]
        for job in loose:
            try:
                if self.show(job).job["state"] in TERMINAL_JOB_STATES:
                    done.append(job)
            except Refused as err:  # no such job (or not ours): the future fails
                if err.code not in ("not_found", "forbidden"):
                    raise
                with self._lock:
                    fut = self._futures.pop(job, None)
                if fut is not None:
                    with contextlib.suppress(cf.InvalidStateError):
                        fut.set_exception(err)
        return done

    def _complete(self, job: str) -> None:
        with self._lock:
            fut = self._futures.get(job)
        if fut is None or fut.done() or fut.cancelling:
            return
        result = self.result(job)
        if result.state not in TERMINAL_JOB_STATES:
            return
        with self._lock:
            self._futures.pop(job, None)
        with contextlib.suppress(cf.InvalidStateError):  # cancelled meanwhile
            fut.set_result(result)

    # -- requests ----------------------------------------------------------------------

    def show(self, job: str) -> JobsShowReply:
        reply: JobsShowReply = self.grid.ask(JobsShow(job=job), what=f"show job {job}")
        return reply

    def why(self, job: str) -> dict[str, Any]:
        """Why ``job`` is not running: the ``jobs.why.reply`` fields (docs/jobs.md)."""
        reply: JobsWhyReply = self.grid.ask(JobsWhy(job=job), what=f"explain job {job}")
        return reply.to_dict()

    def result(self, job: str) -> JobResult:
        return JobResult.from_show(self.show(job), self.grid)

    def ls(self, *, state: str | None = None, batch: str | None = None,
             owner: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Job summaries (every page, up to ``limit``)."""
        items: list[dict[str, Any]] = []
        after: str | None = None
        while limit is None or len(items) < limit:
            page = 500 if limit is None else min(500, limit - len(items))
            reply: JobsListReply = self.grid.ask(
                JobsList(state=state, batch=batch, owner=owner, limit=page, after=after),
                what="list jobs")
            items.extend(reply.jobs)
            if not reply.more or not reply.jobs:
                break
            after = str(reply.jobs[-1]["id"])
        return items

    def _each(self, body_type: Callable[..., Any], jobs: Sequence[str], what: str,
              **extra: Any) -> dict[str, Any]:
        counts: dict[str, Any] = {}
        for start in range(0, len(jobs), MAX_JOBS_PER_REQUEST):
            reply = self.grid.ask(body_type(jobs=list(jobs[start:start + MAX_JOBS_PER_REQUEST]),
                                            **extra), what=what)
            for key, value in (getattr(reply, "detail", None) or {}).items():
                if isinstance(value, int) and not isinstance(value, bool):
                    counts[key] = counts.get(key, 0) + value
                else:
                    counts[key] = value
        return counts

    def cancel(self, jobs: Sequence[str]) -> dict[str, Any]:
        return self._each(JobsCancel, jobs, "cancel jobs")

    def hold(self, jobs: Sequence[str], reason: str | None = None) -> dict[str, Any]:
        return self._each(JobsHold, jobs, "hold jobs", **({"reason": reason} if reason else {}))

    def release(self, jobs: Sequence[str]) -> dict[str, Any]:
        return self._each(JobsRelease, jobs, "release jobs")

    def follow(self, job: str) -> Generator[tuple[str, bytes], None, None]:
        """``job``'s output as (stream, bytes) while it runs (from the worker running it),
        then what is left from its stored results; ends when the job has ended. Stopping
        the iteration stops only the following (``close()`` tells the worker at once:
        client/job_follow.py)."""
        with self._lock:
            if self._follows is None:
                self._follows = FollowRouter(self.grid)
            router = self._follows
        return follow_job(self, router, job)

    def watch(self, all: bool = False) -> JobWatch:
        """Job state changes as they happen: an iterator of ``JobEvent`` (job, state,
        at, attempt, worker, exit_code, reason) until ``close()`` (also a context
        manager). Your own jobs' events; ``all=True`` (admins only): every job's, from
        the admins' feed (client/job_watch.py)."""
        with self._lock:
            if self._watches is None:
                self._watches = WatchRouter(self)
            router = self._watches
        return router.open(everyone=all)

    def wait(self, jobs: Iterable[str], timeout: float | None = None) -> list[JobResult]:
        """Block until every job in ``jobs`` ended; their results, in order.
        ``TimeoutError`` (concurrent.futures') when ``timeout`` passes first."""
        futures = [self.future(job) for job in jobs]
        done, _ = cf.wait(futures, timeout=timeout)
        if len(done) != len(futures):
            raise cf.TimeoutError(f"{len(futures) - len(done)} job(s) still running")
        return [f.result() for f in futures]


class JobExecutor(cf.Executor):
    """``grid.executor()``: a ``concurrent.futures.Executor`` that runs shell commands as
    grid jobs. ``submit(command, *args, **options)``: ``command`` a string or an argv list,
    ``args`` appended (quoted), ``options`` as ``JobStore.spec`` on top of the executor's
    defaults; ``map(command, *iterables)`` runs one job per argument tuple. Results are
    ``JobResult``s. Python callables are refused (TypeError): nothing is pickled."""

    def __init__(self, store: JobStore, **defaults: Any) -> None:
        self.store = store
        self.defaults = defaults
        self._futures: list[JobFuture] = []
        self._shutdown = False
        self._lock = threading.Lock()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> JobFuture:  # type: ignore[override]
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
        fut = self.store.submit(fn, *args, **{**self.defaults, **kwargs})
        with self._lock:
            self._futures.append(fut)
        return fut

    def map(self, fn: Any, *iterables: Iterable[Any],  # type: ignore[override]
            timeout: float | None = None, chunksize: int = 1) -> Iterator[JobResult]:
        """One job per tuple of arguments (appended to the command ``fn``); the results
        in order (``TimeoutError`` when ``timeout`` passes first). ``chunksize`` is
        ignored: every job goes in the same few submits anyway."""
        del chunksize
        futures = [self.submit(fn, *args) for args in zip(*iterables, strict=False)]
        deadline = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator[JobResult]:
            for fut in futures:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                yield fut.result(left)

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            futures = list(self._futures)
        if cancel_futures:
            for fut in futures:
                if not fut.done():
                    fut.cancel()
        if wait:
            cf.wait(futures)
