"""The reaper: the worker's commands die with the worker, even when it is killed with -9.

A process executor starts one reaper per worker run (``Reaper.start``): a small child
process, in a session of its own (a Ctrl-C on the worker's terminal does not reach it),
that blocks reading a pipe whose only writer is the worker. When the worker exits, for
whatever reason, the kernel closes its end; the reaper reads EOF and then, at once:

- kills every process in the worker's cgroup tree (cgroup v2: ``cgroup.kill``; v1 and
  older v2 kernels: freeze, SIGKILL each member, thaw, until the tree is empty) and
  removes the tree;
- kills the process groups (and the sessions) of the tasks recorded in the records dir;
- kills every process still carrying the ``XCLOUD_*`` markers of a work dir under the
  worker's state dir.

The last two are what is left where the machine gives the worker no cgroup (see
docs/exec.md): a command that both leaves its session (``setsid``) and scrubs its
environment escapes them.

This file is also run as a script by path (``python -I -S reaper.py``): stdlib only, so
the reaper costs a bare interpreter (~8 MB) and does not import the worker. The kill
helpers are shared with worker/executors/cgroups.py and process.py.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

KILL_ROUNDS = 50  # sweeps of a cgroup before giving up (each waits a little)
ROUND_WAIT_S = 0.02


# -- cgroups -------------------------------------------------------------------------


def _read(path: str) -> str:
    """A small kernel file's text ("" when it cannot be read). Plain ``os`` calls: a
    closed session reads a few of these, and ``open`` builds a text wrapper per call."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return ""
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", errors="replace")


def _write(path: str, text: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, text.encode("ascii"))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def cgroup_dirs(path: str) -> list[str]:
    """``path`` and every cgroup below it, deepest first (the order ``rmdir`` needs)."""
    try:  # a cgroup (kernfs) directory's link count is 2 plus its subdirectories: a
        if os.stat(path).st_nlink == 2:  # session's has none, and listing its control
            return [path]  # files (~6 to ~40) was most of a closed session's sweep
    except OSError:
        return []
    found: list[str] = []
    for top, dirs, _files in os.walk(path, topdown=False):
        found.extend(os.path.join(top, d) for d in dirs)
    if os.path.isdir(path):
        found.append(path)
    return found


def cgroup_pids(path: str) -> list[int]:
    """The processes in cgroup ``path`` and below."""
    pids: list[int] = []
    for directory in cgroup_dirs(path):
        for line in _read(os.path.join(directory, "cgroup.procs")).split():
            with contextlib.suppress(ValueError):
                pids.append(int(line))
    return pids


def signal_cgroup(path: str, signum: int) -> int:
    """Send ``signum`` to every process in cgroup ``path`` and below; how many."""
    count = 0
    for pid in cgroup_pids(path):
        with contextlib.suppress(OSError):
            os.kill(pid, signum)
            count += 1
    return count


def _freeze(path: str, frozen: bool) -> bool:
    """Freeze (or thaw) cgroup ``path``: v2 ``cgroup.freeze``, v1 ``freezer.state``."""
    v2 = os.path.join(path, "cgroup.freeze")
    if os.path.exists(v2):
        return _write(v2, "1" if frozen else "0")
    v1 = os.path.join(path, "freezer.state")
    if os.path.exists(v1):
        return _write(v1, "FROZEN" if frozen else "THAWED")
    return False


def kill_cgroup(path: str) -> int:
    """SIGKILL everything in cgroup ``path`` and below until it is empty; how many
    processes were found. ``cgroup.kill`` (v2, Linux 5.14+) does it in one write; else
    each sweep freezes the cgroup (a frozen process cannot fork), kills its members and
    thaws it (a frozen process dies only once thawed)."""
    if not os.path.isdir(path):
        return 0
    seen: set[int] = set()
    for _ in range(KILL_ROUNDS):
        pids = cgroup_pids(path)
        if not pids:
            break
        seen.update(pids)
        if not _write(os.path.join(path, "cgroup.kill"), "1"):
            frozen = _freeze(path, True)
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if frozen:
                _freeze(path, False)
        time.sleep(ROUND_WAIT_S)
    return len(seen)


def remove_cgroup(path: str, timeout: float = 2.0) -> bool:
    """``rmdir`` cgroup ``path`` and its children (they must be empty, or about to be:
    a killed process leaves its cgroup a moment after the signal)."""
    try:  # the usual case, a session's emptied cgroup with no child: one rmdir, no walk
        os.rmdir(path)  # (a listing of a v1 memory cgroup's ~40 files costs more)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        pass  # children, or a process still leaving: the walk below
    deadline = time.monotonic() + timeout
    for directory in cgroup_dirs(path):
        while True:
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as err:
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    return False
                time.sleep(ROUND_WAIT_S)
    return True


# -- process groups, sessions and markers ---------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields 3.. of /proc/PID/stat (state, ppid, pgrp, session, ...)."""
    text = _read(f"/proc/{pid}/stat")
    return text.rpartition(")")[2].split()


def _all_pids() -> Iterable[int]:
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if name.isdigit():
                yield int(name)


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def _kill_matching(match: Callable[[int], bool]) -> int:
    """SIGKILL the groups of the processes ``match`` selects, until none is left alive."""
    me, own_group = os.getpid(), os.getpgrp()
    found: set[int] = set()
    for _ in range(10):
        victims = [pid for pid in _all_pids() if pid != me and _alive(pid) and match(pid)]
        if not victims:
            break
        for pid in victims:
            found.add(pid)
            with contextlib.suppress(OSError):
                group = os.getpgid(pid)
                if group != own_group:
                    os.killpg(group, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(ROUND_WAIT_S)
    return len(found)


def kill_sessions(sids: Iterable[int]) -> int:
    """SIGKILL every process whose session or process group is one of ``sids`` (a task's
    shell leads both); how many were found."""
    wanted = {int(s) for s in sids if int(s) > 1} - {os.getpgrp(), os.getsid(0)}
    if not wanted:
        return 0

    def member(pid: int) -> bool:
        fields = _stat_fields(pid)
        try:
            return int(fields[2]) in wanted or int(fields[3]) in wanted
        except (IndexError, ValueError):
            return False

    for sid in wanted:
        with contextlib.suppress(OSError):
            os.killpg(sid, signal.SIGKILL)
    return _kill_matching(member)


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def kill_marked(root: str) -> int:
    """SIGKILL every process marked as a task whose work dir is under ``root``."""
    prefix = root.rstrip(os.sep) + os.sep

    def marked(pid: int) -> bool:
        env = _environ(pid)
        return "XCLOUD_EXEC_ID" in env and env.get("XCLOUD_WORKDIR", "").startswith(prefix)

    return _kill_matching(marked)


def recorded_groups(records: str) -> list[int]:
    """The process groups of the tasks recorded in ``records`` (process.py writes one
    ``*.json`` per running task)."""
    groups: list[int] = []
    with contextlib.suppress(OSError):
        for name in os.listdir(records):
            if not name.endswith(".json"):
                continue
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                data = json.loads(_read(os.path.join(records, name)))
                groups.append(int(data["pgid"]))
    return groups


# -- the reaper process ---------------------------------------------------------------


class Reaper:
    """The worker's side of a reaper: starts the process and holds the pipe it watches.

    ``stop`` (a clean exit) closes the pipe and waits: the reaper then kills what is left
    (nothing, after a clean stop) and removes the cgroup tree.
    """

    def __init__(self, cgroups: list[str], records: str | None = None,
                 marked: str | None = None) -> None:
        self.args = [f"--cgroup={path}" for path in cgroups]
        self.args += [f"--records={records}"] if records else []
        self.args += [f"--marked={marked}"] if marked else []
        self.proc: subprocess.Popen[bytes] | None = None
        self._pipe = -1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Start the reaper (OSError if it cannot be)."""
        read_end, write_end = os.pipe()  # both close-on-exec: no command inherits them
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), *self.args],
                stdin=read_end, stdout=subprocess.DEVNULL, close_fds=True,
                start_new_session=True)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._pipe = write_end

    def stop(self, timeout: float = 10.0) -> None:
        """Let the reaper sweep and exit, as it would at the worker's death."""
        if self._pipe >= 0:
            with contextlib.suppress(OSError):
                os.close(self._pipe)
            self._pipe = -1
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()



def reap(cgroups: list[str], records: str | None, marked: str | None) -> int:
    """Kill everything the worker left (see the module docstring); how many processes."""
    count = 0
    for path in cgroups:
        count += kill_cgroup(path)
    if records:
        count += kill_sessions(recorded_groups(records))
    if marked:
        count += kill_marked(marked)
    for path in cgroups:
        remove_cgroup(path)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Kill a worker's commands when it exits.")
    parser.add_argument("--cgroup", action="append", default=[],
                        help="a cgroup tree of the worker (repeatable)")
    parser.add_argument("--records", help="the process executor's task records")
    parser.add_argument("--marked", help="kill processes marked with a work dir under this")
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    while True:  # the worker never writes: this returns at its exit
        try:
            if not os.read(0, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    count = reap(args.cgroup, args.records, args.marked)
    if count:
        print(f"xcloud reaper: killed {count} process(es) the worker left",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
