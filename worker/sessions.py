"""Per-reservation session records, persisted so a restarted worker knows its sessions.

Layout under the worker's state dir::

    sessions/<name>/session.json   the record below (mode 0600, written atomically)
    sessions/<name>/work/          the session's private work dir (mode 0700)

``<name>`` is the reservation id when it is a harmless file name, else a hash of it: a
reservation id comes off the wire and must never steer a path. A restarted worker loads
every record (``SessionStore.load_all``); the exec service re-opens those the executor can
still use and removes the rest, plus any directory without a readable record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECORD = "session.json"
WORK = "work"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def safe_name(value: str) -> str:
    """``value`` when it is a harmless file name, else a hash of it."""
    if _SAFE_NAME.match(value) and value not in (".", ".."):
        return value
    return "h-" + hashlib.sha256(value.encode()).hexdigest()[:32]


def _retry_removal(func: Any, target: str, _exc: Any, top: str | None = None) -> None:
    """rmtree's error hook: make the entry's directory (and it) writable, then remove it
    again. Only removals are retried: the hook is also called for ``os.open``,
    ``os.scandir`` or ``os.lstat`` of an entry that went away meanwhile (another thread
    closing the same session), and ``os.open`` again without its flags is a TypeError.
    Only directories inside ``top`` (the tree being removed) are ever chmodded: the
    parent of the tree is not ours (a session dir's parent may be /tmp itself)."""
    parent = os.path.dirname(target) or "."
    with contextlib.suppress(OSError):
        if top is not None and _inside(parent, top):
            os.chmod(parent, stat.S_IRWXU)
        if os.path.isdir(target) and not os.path.islink(target):
            os.chmod(target, stat.S_IRWXU)
    if func in (os.rmdir, os.unlink, os.remove):
        with contextlib.suppress(FileNotFoundError):
            func(target)
    elif os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target, ignore_errors=True)  # now readable: once more, quietly


def _inside(path: str, top: str) -> bool:
    path, top = os.path.abspath(path), os.path.abspath(top)
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def remove_tree(path: Path) -> None:
    """``rm -rf`` that also copes with directories a command made unwritable."""

    def retry(func: Any, target: str, exc: Any) -> None:
        _retry_removal(func, target, exc, str(path))

    try:  # the usual case, a short job's empty work dir: one rmdir, no walk
        os.rmdir(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass  # not empty, not a directory (a symlink), or not writable: the walk below
    try:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=retry)
        else:
            shutil.rmtree(path, onerror=retry)
    except OSError as err:
        log.error("cannot remove %s: %s", path, err)


@dataclass
class SessionRecord:
    """What the worker knows of one open reservation."""

    rid: str
    client: str
    worker: str
    opened_at: float = field(default_factory=time.time)
    reservation: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    handle: dict[str, Any] | None = None  # the executor's SessionHandle.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionRecord:
        return cls(
            rid=str(data["rid"]),
            client=str(data["client"]),
            worker=str(data["worker"]),
            opened_at=float(data.get("opened_at", 0.0)),
            reservation=dict(data.get("reservation") or {}),
            limits=dict(data.get("limits") or {}),
            handle=dict(data["handle"]) if data.get("handle") else None,
        )


class SessionStore:
    """The ``sessions/`` directory of a worker's state dir."""

    def __init__(self, state_dir: Path | str) -> None:
        self.root = Path(state_dir) / "sessions"

    @staticmethod
    def dirname(rid: str) -> str:
        return safe_name(rid)

    def path(self, rid: str) -> Path:
        return self.root / self.dirname(rid)

    def workdir(self, rid: str) -> Path:
        return self.path(rid) / WORK

    def prepare(self, rid: str) -> Path:
        """Create the session's directory (0700, like ``sessions/``); return its work dir."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self.path(rid).mkdir(mode=0o700, exist_ok=True)
        return self.workdir(rid)

    def save(self, record: SessionRecord) -> None:
        """Write the record atomically (0600 file in a 0700 dir)."""
        directory = self.path(record.rid)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)
        tmp = directory / f".{RECORD}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(record.to_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / RECORD)

    def load_all(self) -> tuple[list[SessionRecord], list[Path]]:
        """(readable records, directories without one) found under ``sessions/``."""
        records: list[SessionRecord] = []
        junk: list[Path] = []
        if not self.root.is_dir():
            return records, junk
        for directory in sorted(self.root.iterdir()):
            if not directory.is_dir() or directory.is_symlink():
                junk.append(directory)
                continue
            try:
                record = SessionRecord.from_dict(json.loads((directory / RECORD).read_text()))
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("session dir %s has no usable record (%s)", directory, err)
                junk.append(directory)
                continue
            if self.path(record.rid) != directory:
                log.warning("session record in %s names reservation %r; ignored",
                            directory, record.rid)
                junk.append(directory)
                continue
            records.append(record)
        return records, junk

    def remove(self, rid: str) -> None:
        remove_tree(self.path(rid))
