"""Processes marked as ours by their environment (``XCLOUD_EXEC_ID``, and
``XCLOUD_RESERVATION`` for a session), found with psutil and killed by whole process
group: what the process executor uses to end a session's strays and a dead worker's
orphans (worker/executors/process.py).
"""

from __future__ import annotations

import contextlib
import os
import signal as _signal
import time
from collections.abc import Callable, Iterable

import psutil


def kill_marked(match: Callable[[dict[str, str]], bool]) -> int:
    """SIGKILL the process groups of every process whose environment ``match``es.

    Whole groups, because a shell may fork between our scan and our kill (the group
    signal reaches the new child; a per-pid kill would miss it); and again until a
    scan finds nothing alive. Returns how many processes were found.
    """
    own_group = os.getpgrp()
    found: set[int] = set()
    others: list[psutil.Process] = []
    for _ in range(10):
        victims = [p for p in _marked_processes(match) if _alive(p)]
        if not victims:
            break
        for proc in victims:
            found.add(proc.pid)
            with contextlib.suppress(OSError):
                pgid = os.getpgid(proc.pid)
                if pgid != own_group:
                    os.killpg(pgid, _signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                proc.kill()
                if proc.ppid() != os.getpid():
                    others.append(proc)
        # Never wait() on our own children here: psutil would reap them and steal
        # their exit status from the Popen that reports it. Poll the others until
        # they are gone or zombies (their parent reaps them; in a container maybe
        # nobody does).
        deadline = time.monotonic() + 2.0
        while others and time.monotonic() < deadline:
            others = [p for p in others if _alive(p)]
            if others:
                time.sleep(0.01)
    return len(found)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _marked_processes(match: Callable[[dict[str, str]], bool]) -> Iterable[psutil.Process]:
    me = os.getpid()
    uid = os.getuid()
    for proc in psutil.process_iter():
        try:
            if proc.pid == me or (uid != 0 and proc.uids().real != uid):
                continue
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if "XCLOUD_EXEC_ID" in env and match(env):
            yield proc
