"""One ``xcloud up`` per home: an exclusive lock on ``$XCLOUD_HOME/up.lock``.

Two grids on one home share its database, its worker state directories and its
config.toml: the second one would revoke the first one's principals and mark its live
workers offline. So ``xcloud up`` takes an ``flock`` on a file in the home before it
touches anything, holds it for the grid's life, and writes into it who holds it (pid,
broker URL). A second ``xcloud up`` finds the lock taken, says which grid runs there and
exits, having changed nothing. The kernel drops the lock when the process ends, however
it ends, so a killed grid leaves no stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from coordinator.errors import CoordinatorError

LOCK_NAME = "up.lock"


class HomeInUse(CoordinatorError):
    """Another ``xcloud up`` holds this home."""

    code = "conflict"


class HomeLock:
    """The held lock of one home; ``acquire`` it, ``describe`` the grid, ``release`` it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / LOCK_NAME
        self._fd: int | None = None

    @classmethod
    def acquire(cls, home: Path) -> HomeLock:
        """Take the lock, or raise ``HomeInUse`` naming the grid that holds it."""
        lock = cls(home)
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise HomeInUse(_in_use(home, holder)) from None
        except BaseException:
            os.close(fd)
            raise
        lock._fd = fd
        lock.describe()
        return lock

    def describe(self, **facts: Any) -> None:
        """Write who holds the lock (pid, start time and ``facts``, e.g. the broker URL)."""
        if self._fd is None:
            return
        text = json.dumps({"pid": os.getpid(), "started_at": time.time(), **facts})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode(), 0)

    def release(self) -> None:
        """Let go (idempotent). The file stays: removing it could let two grids each
        lock a different file of the same name."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> HomeLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _in_use(home: Path, holder: dict[str, Any]) -> str:
    facts = []
    if holder.get("pid"):
        facts.append(f"pid {holder['pid']}")
    if holder.get("broker"):
        facts.append(f"broker {holder['broker']}")
    held_by = f" ({', '.join(facts)})" if facts else ""
    return (f"a grid already runs in {home}{held_by}; stop it first (Ctrl-C in its "
            "terminal), or start this one with another --home")
