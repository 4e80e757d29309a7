"""What the docker driver keeps in its handles (``driver_state``), typed.

Only this driver reads it. A session's state names its container, the parameters to
recreate it (``ContainerParams``), how the work dir was made writable for the container
user and how many times the container was recreated; a task's names the container and
the engine's exec id. ``STATE_VERSION`` is the layout: a handle of any other layout is
not recovered (the exec layer cleans it up instead).
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.executors.base import (
    DriverState,
    ExecutorError,
    SessionHandle,
    TaskHandle,
    WorkdirAccess,
    read_state,
)
from worker.executors.docker.container import WORK, ContainerParams, parse_user

DRIVER = "docker"
STATE_VERSION = 1


@dataclass
class SessionState:
    container_id: str
    params: ContainerParams | None  # None: the container cannot be recreated
    workdir_access: str  # "chown" | "own" | "open" (Containers.prepare_workdir)
    recreated: int = 0

    def dump(self) -> DriverState:
        return DriverState(STATE_VERSION, {
            "container_id": self.container_id,
            "params": self.params.to_dict() if self.params else None,
            "workdir_access": self.workdir_access,
            "recreated": self.recreated,
        })

    @classmethod
    def of(cls, handle: SessionHandle) -> SessionState:
        """The state in a session handle; ExecutorError when it is not readable."""
        data = read_state(handle, DRIVER, STATE_VERSION)
        try:
            return cls(container_id=str(data.get("container_id") or ""),
                       params=ContainerParams.from_dict(data.get("params")),
                       workdir_access=str(data.get("workdir_access") or ""),
                       recreated=int(data.get("recreated") or 0))
        except (TypeError, ValueError) as err:
            raise ExecutorError(f"docker session handle is malformed: {err}") from err

    def access(self) -> WorkdirAccess:
        """The work dir as commands see it (the bind mount) and how what the worker
        writes there reaches the container user: chowned to a numeric user when the
        work dir was (``chown``), opened to everyone when it was (``open``)."""
        ids = parse_user(self.params.user) if self.params is not None else None
        if self.workdir_access == "chown" and ids is not None:
            return WorkdirAccess(mount=WORK, uid=ids[0], gid=ids[1])
        return WorkdirAccess(mount=WORK, open=self.workdir_access == "open")


@dataclass(frozen=True)
class TaskState:
    container_id: str
    exec_id: str

    def dump(self) -> DriverState:
        return DriverState(STATE_VERSION, {"container_id": self.container_id,
                                           "exec_id": self.exec_id})

    @classmethod
    def of(cls, handle: TaskHandle) -> TaskState:
        data = read_state(handle, DRIVER, STATE_VERSION)
        return cls(container_id=str(data.get("container_id") or ""),
                   exec_id=str(data.get("exec_id") or ""))


def container_of(handle: SessionHandle | TaskHandle) -> str:
    """The container of a docker handle ("" when it names none)."""
    if isinstance(handle, SessionHandle):
        return SessionState.of(handle).container_id
    return TaskState.of(handle).container_id
