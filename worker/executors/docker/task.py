"""One command in a session container: an engine exec, its output and how it ended.

The engine reports a death by signal N as exit status 128+N, the same as a command that
exits 128+N itself, and an OOM kill as a plain SIGKILL. So the exit is worked out here
from more evidence: the signals the driver sent, the OOM marker the wrapper's EXIT trap
leaves on the work dir, a post-mortem look at the memory cgroup's OOM counter when the
wrapper itself was killed, and the state of the container when the exec is gone.
"""

from __future__ import annotations

import logging
import re
import signal as _signal
import socket as _socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.executors.base import (
    ExecutorError,
    ExitResult,
    OutputSink,
    PolledInput,
    TaskHandle,
    TaskSpec,
)
from worker.executors.docker.container import Containers
from worker.executors.docker.wrapper import POSTMORTEM_SCRIPT, oom_count

log = logging.getLogger(__name__)

PID_WAIT_S = 5.0
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
KILLED = 128 + _signal.SIGKILL


@dataclass
class Task:
    handle: TaskHandle
    key: str  # wrapper.task_key(task id)
    container_id: str
    exec_id: str
    on_output: OutputSink
    stream: Iterator[tuple[bytes | None, bytes | None]] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: ExitResult | None = None
    signals: set[int] = field(default_factory=set)  # sent by the driver
    thread: threading.Thread | None = None
    stdin: SocketInput | None = None  # TaskSpec.stdin: the exec's attached connection


def task_env(spec: TaskSpec) -> dict[str, str]:
    """The command's environment: the image's, HOME=/work, the task's, our markers."""
    env = {"TERM": spec.tty.term if spec.tty else "dumb"}
    for name, value in spec.env.items():
        if not _ENV_NAME.match(name) or "\0" in value:
            raise ExecutorError(f"invalid environment variable {name!r}")
        env[name] = value
    env.update({"XCLOUD_RESERVATION": spec.session.session_id,
                "XCLOUD_EXEC_ID": spec.task_id})
    return env


def wait_started(containers: Containers, exec_id: str) -> int | None:
    """The exec's host pid, once the engine has started it (None if unknown).

    exec_start answers before runc has spawned the process (tens of milliseconds
    later on a busy machine). Waiting here means that when start() returns the
    command really runs, so exec.started can carry its pid and a signal() sent
    right away finds it. The engine offers no notification: poll, backing off.
    """
    api = containers.client.api
    delay = 0.001
    deadline = time.monotonic() + PID_WAIT_S
    while True:
        try:
            info = api.exec_inspect(exec_id)
        except Exception as err:
            log.debug("exec_inspect %s: %s", exec_id[:12], err)
            return None
        pid = int(info.get("Pid") or 0)
        if pid or info.get("ExitCode") is not None:
            return pid or None
        if time.monotonic() >= deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def pump(task: Task) -> str | None:
    """Forward the exec's output to the task's sink until it ends; an error text when
    the stream broke (the container went away under it)."""
    try:
        assert task.stream is not None
        for out, err in task.stream:
            for name, data in (("stdout", out), ("stderr", err)):
                if not data:
                    continue
                try:
                    task.on_output(name, data)
                except Exception:
                    log.exception("output sink of task %s failed", task.handle.task_id)
    except Exception as exc:
        return f"output stream broken: {exc}"
    return None


def exit_code(containers: Containers, exec_id: str) -> int | None:
    """The exec's exit code; None if the engine no longer knows it."""
    import docker.errors

    api = containers.client.api
    # The engine records the exit before it closes the stream, so this normally
    # answers at once; the short bounded retry only guards against engines that
    # do not.
    for delay in (0.0, 0.005, 0.02, 0.05, 0.1, 0.2):
        if delay:
            time.sleep(delay)
        try:
            info = api.exec_inspect(exec_id)
        except docker.errors.NotFound:
            return None
        if not info.get("Running"):
            code = info.get("ExitCode")
            return int(code) if code is not None else None
    return None


def take_oom_marker(workdir: str, key: str) -> bool:
    """Did the wrapper's EXIT trap see the OOM counter go up? (Consumes the marker.)"""
    marker = Path(workdir) / ".xcloud" / f"{key}.oom"
    try:
        marker.unlink()
    except FileNotFoundError:
        return False
    except OSError:
        return marker.exists()
    return True


def exit_result(containers: Containers, task: Task, *, workdir: str, closing: bool,
                memory_bytes: int | None, duration: float, error: str | None) -> ExitResult:
    """How the task ended (see the module docstring)."""
    import docker.errors

    code = exit_code(containers, task.exec_id)
    cid = task.container_id
    killed = code is None or code == KILLED
    if closing and killed:
        return ExitResult(exit_code=None, signal=int(_signal.SIGKILL), duration_s=duration,
                          error="session closed")
    if code is None:
        reason = containers.dead_reason(cid)
        return ExitResult(exit_code=None, signal=int(_signal.SIGKILL), duration_s=duration,
                          oom_killed="OOM" in reason,
                          error=error or f"session container {reason or 'lost'}")
    oom = take_oom_marker(workdir, task.key)
    if code == KILLED and not oom:
        # Killed by SIGKILL: by us, or by the kernel's OOM killer in the container's
        # memory cgroup? The wrapper noted the cgroup's oom_kill count at start.
        try:
            at_start, now = containers.run(
                cid, ["/bin/sh", "-c", POSTMORTEM_SCRIPT, "xcloud", task.key]
            ).split()[:2]
            before, after = oom_count(at_start), oom_count(now)
            oom = before is not None and after is not None and after > before
        except (ExecutorError, ValueError, docker.errors.APIError):
            # The container itself may have died (its PID 1 OOM-killed).
            oom = "OOM" in containers.dead_reason(cid)
    if oom:
        log.info("task %s: the OOM killer struck (limit %s bytes, exit %s)",
                 task.handle.task_id, memory_bytes, code)
        if code == KILLED:
            return ExitResult(exit_code=None, signal=int(_signal.SIGKILL),
                              duration_s=duration, oom_killed=True, error=error)
        # The command survived losing a process (`hog | tee log`): still worth saying.
        return ExitResult(exit_code=code, duration_s=duration, oom_killed=True, error=error)
    # A command may exit 128+N itself: report a signal only when we sent that one.
    if code > 128 and (code - 128) in task.signals:
        return ExitResult(exit_code=None, signal=code - 128, duration_s=duration,
                          error=error)
    return ExitResult(exit_code=code, duration_s=duration, error=error)


class SocketInput(PolledInput):
    """The stdin of an exec started with ``socket=True``: the engine's hijacked
    connection, whose read side the output pump reads. Writes never block (poll, then
    ``MSG_DONTWAIT``); closing shuts the write side down, which the engine passes on as
    EOF to the command."""

    def __init__(self, conn: Any) -> None:
        self._sock: _socket.socket = getattr(conn, "_sock", conn)
        super().__init__(self._sock.fileno())

    def _send(self, data: bytes | memoryview) -> int:
        return self._sock.send(data, _socket.MSG_DONTWAIT)

    def _end(self) -> None:
        self._sock.shutdown(_socket.SHUT_WR)


def attached_output(conn: Any, *, tty: bool = False
                    ) -> Iterator[tuple[bytes | None, bytes | None]]:
    """(stdout, stderr) pieces of an exec started with ``socket=True``, as the engine
    multiplexes them (what ``exec_start(stream=True, demux=True)`` yields); with a
    ``tty`` the engine sends the terminal's raw bytes, all of them stdout."""
    from docker.utils.socket import demux_adaptor, frames_iter

    for stream_id, data in frames_iter(conn, tty):
        yield (data, None) if tty else demux_adaptor(stream_id, data)
