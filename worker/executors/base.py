"""The executor interface, shaped like Nomad's task drivers.

A *session* is the environment of one reservation (a private work dir; for docker, a
container that every command of the reservation runs in). A *task* is one command. The
worker's exec layer owns the protocol (grants, sequence numbers, streaming); executors
only run things and report bytes and exits, so every driver has the same small shape:

    ex.open_session(SessionSpec)            -> SessionHandle
    ex.start(TaskSpec, on_output)           -> TaskHandle   (returns at once)
    ex.wait(handle, timeout)                -> ExitResult | None
    ex.signal(handle, signum) / ex.stop(handle, grace_s)
    ex.close_session(session)               (stops its tasks, removes its resources)
    ex.recover(handles) / ex.cleanup_orphans(keep)   after a worker restart

Handles are plain JSON-able dataclasses so a restarted worker can recover or clean up
what it left behind.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from worker.errors import WorkerError

OutputSink = Callable[[str, bytes], None]
"""Called with ("stdout" | "stderr", data) from the executor's reader threads, in order
per stream. It must not block for long: the exec layer queues and coalesces."""


class ExecutorError(WorkerError):
    """An executor could not do what was asked (engine down, image missing, ...)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits; None means the executor's (worker config's) default."""

    cpus: float | None = None
    memory_bytes: int | None = None
    pids: int | None = None


@dataclass(frozen=True)
class SessionSpec:
    session_id: str  # the reservation id
    workdir: Path  # host path, created by the caller, private to the session
    owner: str  # the client principal, for labels and logs
    limits: Limits = field(default_factory=Limits)
    image: str | None = None  # docker only
    network: bool = False  # docker only: allow a network (worker owner's choice)


@dataclass
class SessionHandle:
    session_id: str
    executor: str
    workdir: str
    container_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TaskSpec:
    task_id: str  # the exec id
    command: str  # a shell command line, run with /bin/sh -c
    session: SessionHandle
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    stdin: bool = False


@dataclass
class TaskHandle:
    task_id: str
    executor: str
    session_id: str
    pid: int | None = None  # process group leader (process) / host pid (docker, if known)
    container_id: str | None = None
    exec_id: str | None = None  # docker exec id
    started_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExitResult:
    exit_code: int | None  # None when killed by a signal
    signal: int | None = None
    duration_s: float = 0.0
    timed_out: bool = False
    oom_killed: bool = False
    error: str | None = None


class Executor(abc.ABC):
    """One driver. Thread-safe: the exec layer calls it from several threads."""

    name: str = ""

    @abc.abstractmethod
    def capabilities(self) -> dict[str, Any]:
        """What this driver offers (for the worker's caps document)."""

    @abc.abstractmethod
    def open_session(self, spec: SessionSpec) -> SessionHandle:
        """Prepare the environment of a reservation (idempotent per session id)."""

    @abc.abstractmethod
    def close_session(self, session: SessionHandle) -> None:
        """Stop every task of the session and release its resources."""

    @abc.abstractmethod
    def start(self, spec: TaskSpec, on_output: OutputSink) -> TaskHandle:
        """Start a task and return at once; output flows to ``on_output``."""

    @abc.abstractmethod
    def wait(self, handle: TaskHandle, timeout: float | None = None) -> ExitResult | None:
        """The task's exit, once its output has been fully delivered; None on timeout."""

    @abc.abstractmethod
    def signal(self, handle: TaskHandle, signum: int) -> None:
        """Deliver ``signum`` to the task's whole process group."""

    def stop(self, handle: TaskHandle, grace_s: float = 5.0) -> ExitResult | None:
        """SIGTERM, then SIGKILL after ``grace_s``."""
        import signal as _signal

        self.signal(handle, _signal.SIGTERM)
        result = self.wait(handle, grace_s)
        if result is None:
            self.signal(handle, _signal.SIGKILL)
            result = self.wait(handle, grace_s)
        return result

    def recover(self, sessions: list[SessionHandle]) -> list[SessionHandle]:
        """After a restart: the sessions still usable (default: none survive)."""
        return []

    def cleanup_orphans(self, keep: set[str]) -> int:
        """Remove resources of sessions not in ``keep``; returns how many were removed."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook, most drivers hold nothing
        """Release the driver's own resources (clients, threads)."""
