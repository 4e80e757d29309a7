"""What the executor tests share: an output collector and start/run helpers that drive
any executor through the interface of worker/executors/base.py."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from worker.executors.base import Executor, ExitResult, SessionHandle, TaskHandle, TaskSpec


@dataclass
class Output:
    """Collects what a task streamed, in arrival order."""

    parts: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, stream: str, data: bytes) -> None:
        with self.lock:
            self.parts.append((stream, data))

    def of(self, stream: str) -> bytes:
        with self.lock:
            return b"".join(d for s, d in self.parts if s == stream)

    def text(self, stream: str = "stdout") -> str:
        return self.of(stream).decode()


def start(ex: Executor, session: SessionHandle, command: str, task_id: str | None = None,
          **kw: Any) -> tuple[TaskHandle, Output]:
    out = Output()
    spec = TaskSpec(task_id=task_id or f"t-{uuid.uuid4().hex[:10]}", command=command,
                    session=session, **kw)
    return ex.start(spec, out), out


def run(ex: Executor, session: SessionHandle, command: str, timeout: float = 30.0,
        **kw: Any) -> tuple[ExitResult, Output]:
    handle, out = start(ex, session, command, **kw)
    result = ex.wait(handle, timeout)
    assert result is not None, f"{command!r} did not finish in {timeout}s"
    return result, out


def marked_processes(root: Path, session_id: str | None = None) -> list[psutil.Process]:
    """Live processes started by a process executor whose work dirs are under ``root``
    (of one session when given)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if not env.get("XCLOUD_WORKDIR", "").startswith(str(root)):
            continue
        if session_id is None or env.get("XCLOUD_RESERVATION") == session_id:
            found.append(proc)
    return found
