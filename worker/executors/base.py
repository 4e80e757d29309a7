"""The executor interface, shaped like Nomad's task drivers.

A *session* is the environment of one reservation (a private work dir; for docker, a
container that every command of the reservation runs in). A *task* is one command. The
worker's exec layer owns the protocol (grants, sequence numbers, streaming); executors
only run things and report bytes and exits, so every driver has the same small shape:

    Driver.fingerprint(config)              -> ExecutorCapabilities  (cheap, never raises)
    Driver.create(ExecutorContext)          -> the driver            (see registry.py)
    ex.open_session(SessionSpec)            -> SessionHandle
    ex.start(TaskSpec, on_output)           -> TaskHandle   (returns at once)
    ex.wait(handle, timeout)                -> ExitResult | None
    ex.notify_exit(handle, callback)        (callback(ExitResult) once it is known)
    ex.signal(handle, signum) / ex.stop(handle, grace_s)
    ex.close_session(session)               (stops its tasks, removes its resources)
    ex.recover(handles) / ex.cleanup_orphans(keep)   after a worker restart
    Driver.workdir_access(session)          -> WorkdirAccess (how commands see the work dir)

Handles are plain JSON-able dataclasses so a restarted worker can recover or clean up
what it left behind. What a driver needs to find its resources again (a container id,
a process group) lives in the handle's ``driver_state``: versioned, and read only by
the driver that wrote it. A handle of another layout or version is never trusted: the
driver does not recover it, and ``close_session`` cleans up what it can find without it.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import select
import signal as _signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, cast

from broker.config import WorkerConfig
from schemas.outcome import Outcome
from worker.errors import WorkerError
from worker.io_loop import IoLoop

OutputSink = Callable[[str, bytes], None]
"""Called with ("stdout" | "stderr", data) from the executor's reader threads (the process
executor: its one I/O loop thread, worker/io_loop.py), in order per stream. It must not
block for long: the exec layer queues and coalesces. One that may be full implements
``PacedSink`` instead of blocking."""

ExitCallback = Callable[["ExitResult"], None]
"""Called with a task's result once it is known (``Executor.notify_exit``)."""


class PacedSink(Protocol):
    """An ``OutputSink`` that says "full" instead of blocking (worker/output.py).

    ``offer`` always takes ``data``; it returns False when the sink is now over its bound,
    and then calls ``on_room()`` (from any thread, once) when room frees: the reader stops
    reading that stream until then, so the command's writes block and memory stays
    bounded, without a thread blocked per stream.
    """

    def __call__(self, stream: str, data: bytes) -> None: ...

    def offer(self, stream: str, data: bytes, on_room: Callable[[], None]) -> bool: ...


def paced_sink(sink: OutputSink) -> PacedSink | None:
    """``sink`` as a ``PacedSink`` (also when it is the bound ``feed`` of one), else None.

    What ``isinstance(x, PacedSink)`` decides, without it: a runtime protocol check looks
    up every member through ``hasattr`` (2.4 % of a worker's CPU at one call per job)."""
    for candidate in (sink, getattr(sink, "__self__", None)):
        if callable(candidate) and callable(getattr(candidate, "offer", None)):
            return cast(PacedSink, candidate)
    return None

#: The resource limits a driver may enforce (``Limits`` field names).
LIMIT_NAMES = ("cpus", "memory_bytes", "pids")

GpuDelivery = Literal["env", "devices"]
"""How a driver gives a job its GPUs (``ExecutorCapabilities.gpus``): ``env``, the command
sees them named in ``CUDA_VISIBLE_DEVICES``/``NVIDIA_VISIBLE_DEVICES`` (it can reach every
device of the machine); ``devices``, the session gets only those devices (a container's
device request, ``GpuSessionSpec.gpu_devices``) and the caller sets no variables."""


class ExecutorError(WorkerError):
    """An executor could not do what was asked (engine down, image missing, ...)."""


class HandleError(ExecutorError):
    """A persisted handle cannot be read (another layout, or not a handle at all)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits; None means the executor's (worker config's) default."""

    cpus: float | None = None
    memory_bytes: int | None = None
    pids: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The limits that are set."""
        values = ((name, getattr(self, name)) for name in LIMIT_NAMES)
        return {name: value for name, value in values if value is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Limits:
        data = data or {}
        return cls(cpus=data.get("cpus"), memory_bytes=data.get("memory_bytes"),
                   pids=data.get("pids"))


@dataclass(frozen=True)
class EngineInfo:
    """A container engine as the fingerprint saw it (worker.caps' ``docker`` object)."""

    available: bool = False
    version: str | None = None
    api_version: str | None = None
    images: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"available": self.available, "version": self.version,
                "api_version": self.api_version, "images": list(self.images)}


@dataclass(frozen=True)
class ExecutorCapabilities:
    """What a driver offers on this machine; the worker's caps document is built from it.

    ``isolation`` is ``none`` (commands share the worker's user and file system) or
    ``container``; ``security_boundary`` says whether a hostile command is contained.
    ``limits`` names the ``Limits`` fields the driver enforces. ``network``: whether a
    session may be given a network. ``gpus``: how a job's GPUs reach its command
    (``GpuDelivery``). The image fields and ``engine`` concern container drivers;
    ``error`` says why a driver cannot run here (its engine does not answer).
    """

    name: str
    isolation: str
    security_boundary: bool
    limits: frozenset[str] = frozenset()
    stdin: bool = False
    tty: bool = False  # runs commands on a pseudo-terminal (TaskSpec.tty)
    network: bool = False
    gpus: GpuDelivery = "env"
    default_image: str | None = None
    image_override: bool = False
    engine: EngineInfo | None = None
    error: str | None = None

    @property
    def available(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class WorkdirAccess:
    """How a session's commands see its work dir, and who must own what the worker
    writes there for them (file transfers, worker/workdir_access.py); the driver says,
    from its own state, so nobody else reads that state.

    ``mount``: where commands see the work dir (a container path); None when they see it
    at its host path. ``uid``/``gid``: hand what the worker writes to that user. ``open``:
    make it writable by everyone instead (the user cannot be given it).
    """

    mount: str | None = None
    uid: int | None = None
    gid: int | None = None
    open: bool = False


@dataclass(frozen=True)
class ExecutorContext:
    """Everything a driver is built from; the registry builds every driver from one."""

    config: WorkerConfig
    state_dir: Path
    worker_id: str
    kill_grace_s: float = 5.0


@dataclass(frozen=True)
class DriverState:
    """A driver's own record in a handle: opaque to everyone else, JSON-able, versioned.

    ``version`` is the driver's layout (``Executor.STATE_VERSION``); 0 means none could be
    read (a handle of an older layout). A driver reads only the versions it knows.
    """

    version: int = 0
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "data": dict(self.data)}

    @classmethod
    def from_dict(cls, data: Any) -> DriverState:
        """The state in ``data``; an unreadable one becomes version 0 (never trusted)."""
        if (isinstance(data, dict) and isinstance(data.get("version"), int)
                and not isinstance(data.get("version"), bool)
                and isinstance(data.get("data", {}), dict)):
            return cls(int(data["version"]), dict(data.get("data") or {}))
        return cls()


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise HandleError(f"handle has no {key}")
    return value


@dataclass
class SessionHandle:
    session_id: str
    executor: str
    workdir: str  # host path
    driver_state: DriverState = field(default_factory=DriverState)

    def to_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "executor": self.executor,
                "workdir": self.workdir, "driver_state": self.driver_state.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> SessionHandle:
        """A persisted handle. One of an older layout keeps its identity with a version-0
        state (so it can be cleaned up); HandleError when not even that can be read."""
        if not isinstance(data, dict):
            raise HandleError("handle is not an object")
        return cls(session_id=_text(data, "session_id"), executor=_text(data, "executor"),
                   workdir=_text(data, "workdir"),
                   driver_state=DriverState.from_dict(data.get("driver_state")))


@dataclass(frozen=True)
class SessionSpec:
    session_id: str  # the reservation id
    workdir: Path  # host path, created by the caller, private to the session
    owner: str  # the client principal, for labels and logs
    limits: Limits = field(default_factory=Limits)
    image: str | None = None  # container drivers only
    network: bool = False  # container drivers only: allow a network (worker owner's choice)
    # Carry the working directory from one command to the next (a reservation's shell:
    # `cd` then `ls`). A batch job's session runs one command and needs none: a driver may
    # then skip its bookkeeping (the process driver writes no `.xcloud/cwd`).
    carry_cwd: bool = True


@dataclass(frozen=True)
class TtySize:
    """A terminal's window size and type (``exec.start``'s ``tty`` object)."""

    rows: int = 24
    cols: int = 80
    term: str = "xterm-256color"

    @classmethod
    def from_wire(cls, data: dict[str, object]) -> TtySize:
        rows, cols, term = data.get("rows"), data.get("cols"), data.get("term")
        return cls(rows=rows if isinstance(rows, int) else 24,
                   cols=cols if isinstance(cols, int) else 80,
                   term=term if isinstance(term, str) and term else "xterm-256color")


@dataclass(frozen=True)
class TaskSpec:
    task_id: str  # the exec id
    command: str  # a shell command line, run with /bin/sh -c
    session: SessionHandle
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    stdin: bool = False
    tty: TtySize | None = None  # run on a pseudo-terminal (stdin implied; docs/exec.md)


@dataclass
class TaskHandle:
    task_id: str
    executor: str
    session_id: str
    pid: int | None = None  # process group leader (process) / host pid (docker, if known)
    started_at: float = 0.0
    driver_state: DriverState = field(default_factory=DriverState)

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "executor": self.executor,
                "session_id": self.session_id, "pid": self.pid,
                "started_at": self.started_at, "driver_state": self.driver_state.to_dict()}


class TaskInput(abc.ABC):
    """The write end of a task's stdin (``TaskSpec.stdin``), for one writer thread.

    Writes never block longer than their ``timeout``, so the exec layer can stop a
    writer whose command no longer reads.
    """

    @abc.abstractmethod
    def write(self, data: bytes | memoryview, timeout: float) -> int:
        """Write some of ``data`` (waiting at most ``timeout`` for room); the count
        written, 0 when there was no room. BrokenPipeError when nobody reads any more."""

    @abc.abstractmethod
    def close(self) -> None:
        """End of input: the task reads EOF (idempotent)."""


class PolledInput(TaskInput):
    """A ``TaskInput`` over a file descriptor: poll for room, then one non-blocking
    write; each driver says how to write and how to end the input."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._closed = False

    @abc.abstractmethod
    def _send(self, data: bytes | memoryview) -> int:
        """One write that never blocks (BlockingIOError when there is no room)."""

    @abc.abstractmethod
    def _end(self) -> None:
        """End the input (the task reads EOF); OSError is ignored."""

    def write(self, data: bytes | memoryview, timeout: float) -> int:
        with self._lock:
            if self._closed:
                raise BrokenPipeError(errno.EPIPE, "stdin is closed")
            poller = select.poll()
            poller.register(self._fd, select.POLLOUT)
            if not poller.poll(max(0, int(timeout * 1000))):
                return 0
            try:
                return self._send(data)
            except BlockingIOError:
                return 0

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                with contextlib.suppress(OSError):
                    self._end()


def read_state(handle: SessionHandle | TaskHandle, driver: str, version: int) -> dict[str, Any]:
    """The data of ``driver``'s state in ``handle`` when written in layout ``version``;
    ExecutorError otherwise (another driver's handle, an older or newer layout)."""
    state = handle.driver_state
    if handle.executor != driver:
        raise ExecutorError(f"{handle.executor!r} handle given to the {driver} driver")
    if state.version != version:
        raise ExecutorError(f"{driver} handle of layout {state.version} (this worker reads "
                            f"{version})")
    return state.data


@dataclass(frozen=True, kw_only=True)
class ExitResult(Outcome):
    """How a task ended, as the driver saw it (``Outcome``'s fields; the exec layer adds
    what only it knows: truncation, output bytes, its own timeout)."""

    duration_s: float = 0.0
    timed_out: bool = False
    oom_killed: bool = False


class Executor(abc.ABC):
    """One driver. Thread-safe: the exec layer calls it from several threads."""

    name: ClassVar[str] = ""
    #: The layout of this driver's ``DriverState``; bump it when the layout changes.
    STATE_VERSION: ClassVar[int] = 1
    #: The worker configuration the driver runs with.
    config: WorkerConfig
    #: The event loop the driver does its tasks' I/O on, if it has one (worker/io_loop.py):
    #: the exec layer puts its timers there too, so one thread serves every command.
    io_loop: IoLoop | None = None

    # -- building -------------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def create(cls, context: ExecutorContext) -> Executor:
        """The driver for one worker (the registry's one way to build it)."""

    @classmethod
    @abc.abstractmethod
    def fingerprint(cls, config: WorkerConfig) -> ExecutorCapabilities:
        """What this driver offers here. Cheap, never raises, imports no engine SDK: the
        worker's caps document is built from it before any driver exists."""

    def capabilities(self) -> ExecutorCapabilities:
        """What this driver offers (its configuration's fingerprint)."""
        return self.fingerprint(self.config)

    # -- driver state ---------------------------------------------------------------

    def state_of(self, handle: SessionHandle | TaskHandle) -> dict[str, Any]:
        """This driver's data in ``handle``; ExecutorError for another driver's handle or
        a layout it does not know."""
        return read_state(handle, self.name, self.STATE_VERSION)

    def knows(self, handle: SessionHandle | TaskHandle) -> bool:
        """Is ``handle`` this driver's, in a layout it reads?"""
        return (handle.executor == self.name
                and handle.driver_state.version == self.STATE_VERSION)

    def make_state(self, data: dict[str, Any]) -> DriverState:
        """``data`` as this driver's current state layout."""
        return DriverState(self.STATE_VERSION, data)

    @classmethod
    def workdir_access(cls, session: SessionHandle) -> WorkdirAccess:  # noqa: ARG003
        """How ``session``'s commands see its work dir (a class method: the file transfer
        side holds handles, not drivers; ``registry.workdir_access``). This default: at
        the host path, as the worker's own user, so nothing is handed over."""
        return WorkdirAccess()

    # -- sessions and tasks ---------------------------------------------------------

    @abc.abstractmethod
    def open_session(self, spec: SessionSpec) -> SessionHandle:
        """Prepare the environment of a reservation (idempotent per session id)."""

    @abc.abstractmethod
    def close_session(self, session: SessionHandle) -> None:
        """Stop every task of the session and release its resources. Must cope with a
        handle it cannot read (another layout): it cleans up by session id then."""

    @abc.abstractmethod
    def start(self, spec: TaskSpec, on_output: OutputSink) -> TaskHandle:
        """Start a task and return at once; output flows to ``on_output``."""

    @abc.abstractmethod
    def wait(self, handle: TaskHandle, timeout: float | None = None) -> ExitResult | None:
        """The task's exit, once its output has been fully delivered; None on timeout."""

    @abc.abstractmethod
    def signal(self, handle: TaskHandle, signum: int) -> None:
        """Deliver ``signum`` to the task's whole process group."""

    def notify_exit(self, handle: TaskHandle, callback: ExitCallback) -> None:
        """Call ``callback(result)`` once, when ``wait`` would return the task's result
        (at once if it already ended); it must not block. This default spends a thread
        blocked in ``wait`` on it; the process driver calls it from its I/O loop."""
        def waiter() -> None:
            try:
                result = self.wait(handle, None)
            except Exception as err:
                result = ExitResult(exit_code=None, error=f"internal error: {err}")
            callback(result or ExitResult(exit_code=None, error="the task was lost"))

        threading.Thread(target=waiter, daemon=True,
                         name=f"{self.name}-exit-{handle.task_id}").start()

    def stop(self, handle: TaskHandle, grace_s: float = 5.0) -> ExitResult | None:
        """SIGTERM, then SIGKILL after ``grace_s``."""
        self.signal(handle, _signal.SIGTERM)
        result = self.wait(handle, grace_s)
        if result is None:
            self.signal(handle, _signal.SIGKILL)
            result = self.wait(handle, grace_s)
        return result

    def recover(self, sessions: list[SessionHandle]) -> list[SessionHandle]:  # noqa: ARG002
        """After a restart: the sessions still usable (default: none survive). Handles
        this driver cannot read are never among them."""
        return []

    def cleanup_orphans(self, keep: set[str]) -> int:  # noqa: ARG002 - a default
        """Remove resources of sessions not in ``keep``; returns how many were removed."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook, most drivers hold nothing
        """Release the driver's own resources (clients, threads)."""

    def task_input(self, handle: TaskHandle) -> TaskInput | None:  # noqa: ARG002
        """The stdin of a task started with ``TaskSpec.stdin`` (None: this driver or
        task takes no input; ``capabilities().stdin`` says whether the driver does)."""
        return None

    def resize(self, handle: TaskHandle, rows: int, cols: int) -> None:  # noqa: ARG002
        """Set the window size of a task started with ``TaskSpec.tty`` (its foreground
        process group gets SIGWINCH); ExecutorError when it has no terminal."""
        raise ExecutorError(f"the {self.name} executor gives commands no terminal")
