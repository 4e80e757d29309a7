"""Control groups for the process executor: every reservation's processes in a cgroup of
its own, so that they are killed by cgroup (not by the ``XCLOUD_*`` markers a command can
scrub) and limited by cgroup (memory and pids for the whole session, not rlimits per
process).

Which mode a worker runs in is decided once, at start (``detect``; ``worker.process_cgroups``
= ``auto`` | ``v2`` | ``v1`` | ``off``):

- ``v2``: the unified hierarchy (``/sys/fs/cgroup`` itself, or ``/sys/fs/cgroup/unified``
  on a hybrid machine), where the worker's own cgroup is writable (root, or a delegated
  subtree). Killing is one write to ``cgroup.kill``; limits (``memory.max``,
  ``memory.swap.max``, ``pids.max``) need the memory and pids controllers enabled for the
  worker's cgroup, else rlimits are used.
- ``v1``: the legacy per-controller hierarchies. Membership is tracked in ``freezer``
  (else ``pids``, else ``memory``); killing freezes the cgroup, kills its members and
  thaws it; limits go to ``memory`` (``memory.limit_in_bytes``, and
  ``memory.memsw.limit_in_bytes`` so no swap) and ``pids`` (``pids.max``).
- ``none``: no writable cgroup. Process groups, sessions and markers, and the reaper:
  a command that both calls ``setsid`` and scrubs its environment escapes (docs/exec.md).

``auto`` takes v2 on a pure v2 machine, else v1 when a v1 hierarchy is writable, else
the unified hierarchy of a hybrid machine, else none.

The layout, below the worker's own cgroup in each hierarchy used::

    <own>/xcloud-<worker>-<pid>-<random>/       one tree per worker run
        s-<reservation>/                        one cgroup per session (limits here)

A tree is recorded in ``<state_dir>/cgroups.json`` when it is made
(worker/executors/cgroup_records.py), so a restarted worker kills and removes what a
previous run left even if its own cgroup changed; the reaper (worker/executors/reaper.py)
usually did already.

A closed session's cgroup, once proven empty (no process, no child cgroup), is kept for
the next session instead of removed (``POOL_MAX`` per tree): making and removing three v1
cgroups (freezer, memory, pids) was a fifth of a short job's cost on the worker, most of
it kernel work (a memory cgroup's allocation, its offlining after ``rmdir``). The next
session renames it to its own name (v1; v2 cannot rename a cgroup, so there it keeps the
name of the session that made it), writes its limits (lifting those the previous session
had, whatever a command did to the files), and reads its OOM count before its first
command runs. One that still holds memory (a file left in a tmpfs stays charged to it)
is removed instead: the next session's limit would count it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from worker.executors import reaper
from worker.executors.base import ExecutorError
from worker.sessions import safe_name

log = logging.getLogger(__name__)

MODES = ("auto", "v2", "v1", "off")
STATE_FILE = "cgroups.json"
V1_TRACKERS = ("freezer", "pids", "memory")
MOUNTINFO = "/proc/self/mountinfo"
PROC_CGROUP = "/proc/self/cgroup"
POOL_MAX = 16  # emptied session cgroups a tree keeps for the next sessions
# Memory still charged to an emptied cgroup above which it is removed, not kept: a file a
# command left in a tmpfs (/dev/shm) stays charged to it, and would count against the next
# session's limit (removed, the kernel moves the charge to the parent).
POOL_CHARGE_MAX = 8 << 20
NAME_TRIES = 64  # names tried for a new session cgroup when its own is taken


class CgroupError(ExecutorError):
    """A cgroup could not be made, joined or limited."""


# -- detection -----------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """A cgroup hierarchy as mounted here: ``version`` 1 or 2, its mount point, the
    cgroup path its mount shows as ``/`` and (v1) the controllers bound to it."""

    version: int
    path: Path
    root: str = "/"
    controllers: frozenset[str] = frozenset()


def parse_mounts(mountinfo: str) -> list[Mount]:
    """The cgroup mounts in ``/proc/self/mountinfo`` text."""
    found: list[Mount] = []
    for line in mountinfo.splitlines():
        before, sep, after = line.partition(" - ")
        if not sep:
            continue
        fields, tail = before.split(), after.split()
        if len(fields) < 6 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        if "rw" not in fields[5].split(","):
            continue  # mounted read-only
        root, point = fields[3], Path(fields[4].replace("\\040", " "))
        if tail[0] == "cgroup2":
            found.append(Mount(2, point, root))
        else:
            options = set(tail[2].split(","))
            found.append(Mount(1, point, root, frozenset(options & set(V1_TRACKERS))))
    return found


def parse_own(proc_cgroup: str) -> dict[str, str]:
    """This process's cgroup per hierarchy: ``"v2"`` -> path, v1 controller -> path."""
    own: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            own["v2"] = path
        for name in controllers.split(","):
            own[name] = path
    return own


def _own_dir(mount: Mount, path: str) -> Path:
    """The directory of cgroup ``path`` under ``mount`` (mount roots of a namespace or a
    bind mount are stripped)."""
    if mount.root != "/" and (path == mount.root or path.startswith(mount.root + "/")):
        path = path[len(mount.root):]
    return mount.path / path.lstrip("/")


def _writable(directory: Path) -> bool:
    return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)


@dataclass(frozen=True)
class Layout:
    """Where this worker's cgroups go: ``version`` 0 (none), 1 or 2, and the worker's own
    cgroup in the tracking hierarchy and in those that limit memory and pids (None when
    that limit falls back to an rlimit). ``note`` says why, for the logs."""

    version: int = 0
    tracker: Path | None = None
    memory: Path | None = None
    pids: Path | None = None
    note: str = ""

    @property
    def mode(self) -> str:
        return f"cgroup v{self.version}" if self.version else "none"

    def describe(self) -> str:
        if not self.version:
            return f"no cgroups ({self.note}): process groups, sessions and markers"
        limits = [n for n, d in (("memory", self.memory), ("pids", self.pids)) if d]
        by = f"cgroup limits {'+'.join(limits)}" if limits else "rlimits"
        return f"cgroup v{self.version} under {self.tracker} ({by}){self.note}"


def _v2(mount: Mount, own: dict[str, str]) -> Layout | None:
    if "v2" not in own:
        return None
    directory = _own_dir(mount, own["v2"])
    if not _writable(directory):
        return None
    available = set(reaper._read(str(directory / "cgroup.controllers")).split())
    # Limits need the controllers delegated to our cgroup; whether they can be enabled
    # below it is found out when the tree is made (CgroupTree.create).
    memory = directory if "memory" in available else None
    pids = directory if "pids" in available else None
    return Layout(2, directory, memory, pids)


def _v1(mounts: list[Mount], own: dict[str, str]) -> Layout | None:
    dirs: dict[str, Path] = {}
    for mount in mounts:
        for name in mount.controllers:
            if name in own and name not in dirs:
                directory = _own_dir(mount, own[name])
                if _writable(directory):
                    dirs[name] = directory
    tracker = next((dirs[n] for n in V1_TRACKERS if n in dirs), None)
    if tracker is None:
        return None
    return Layout(1, tracker, dirs.get("memory"), dirs.get("pids"))


def detect(mode: str = "auto", *, mountinfo: str | None = None,
           proc_cgroup: str | None = None) -> Layout:
    """The layout for ``mode`` on this machine (never raises: none when unusable)."""
    if mode not in MODES:
        raise ExecutorError(f"process_cgroups must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return Layout(note="process_cgroups = off")
    try:
        mounts = parse_mounts(mountinfo if mountinfo is not None
                              else Path(MOUNTINFO).read_text())
        own = parse_own(proc_cgroup if proc_cgroup is not None
                        else Path(PROC_CGROUP).read_text())
    except OSError as err:
        return Layout(note=f"cannot read {err.filename}: {err.strerror}")
    v2 = [m for m in mounts if m.version == 2]
    v1 = [m for m in mounts if m.version == 1]
    pure = [m for m in v2 if not v1]
    candidates: list[Layout | None] = []
    if mode in ("auto", "v2"):
        candidates += [_v2(m, own) for m in pure]
    if mode in ("auto", "v1"):
        candidates.append(_v1(v1, own))
    if mode in ("auto", "v2"):
        candidates += [_v2(m, own) for m in v2 if m not in pure]
    for layout in candidates:
        if layout is not None:
            return layout
    if not mounts:
        return Layout(note="no cgroup file system is mounted")
    wanted = {"v1": "no writable cgroup v1 hierarchy",
              "v2": "no writable cgroup v2 hierarchy"}.get(mode, "no writable cgroup")
    return Layout(note=f"{wanted} (the worker needs root or a delegated cgroup)")


# -- one worker run's tree -----------------------------------------------------------


@dataclass
class SessionCgroup:
    """One session's cgroup: a directory per hierarchy used (the tracker first)."""

    dirs: list[Path]
    memory: Path | None = None
    pids: Path | None = None
    limited: set[str] = field(default_factory=set)  # Limits fields enforced here
    # Made by this run and no process put in it yet: it has had no OOM kill, so
    # ``oom_kills`` needs no read (a job's session runs one command: one read per job).
    fresh: bool = False
    _oom_name: str = field(default="", repr=False)  # the file that has the count here
    _charge_name: str = field(default="", repr=False)  # the file with the bytes charged
    # The limits written to it (None: none, as in a cgroup just made), so that a pooled
    # cgroup's next session writes only what differs and lifts what it does not set.
    _memory_set: int | None = field(default=None, repr=False)
    _pids_set: int | None = field(default=None, repr=False)
    # False once commands ran in it: one as root may have changed a limit file, so a
    # pooled cgroup's next session writes every limit (its last values order v1's pair)
    _limits_known: bool = field(default=True, repr=False)
    # The directories as strings, joined by hand on the per-job path (pathlib's joins and
    # str() were a sixth of a short session's Python time); v2's memory files or v1's.
    _dirs_s: list[str] = field(default_factory=list, init=False, repr=False)
    _memory_s: str = field(default="", init=False, repr=False)
    _pids_s: str = field(default="", init=False, repr=False)
    _memory_v2: bool | None = field(default=None, init=False, repr=False)
    _memsw: bool | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._strings()

    def _strings(self) -> None:
        self._dirs_s = [os.fspath(d) for d in self.dirs]
        self._memory_s = os.fspath(self.memory) if self.memory is not None else ""
        self._pids_s = os.fspath(self.pids) if self.pids is not None else ""

    @property
    def tracker(self) -> Path:
        return self.dirs[0]

    def set_limits(self, memory_bytes: int | None, pids: int | None) -> None:
        """Apply the limits this cgroup can enforce (``limited`` says which); None lifts
        a limit an earlier session of a pooled cgroup set. Where its files are known to
        hold them already (a cgroup just made), nothing is written."""
        if self.memory is not None:
            memory = None if memory_bytes is None else int(memory_bytes)
            if memory != self._memory_set or not self._limits_known:
                self._write_memory(memory)
            self.limited.discard("memory_bytes")
            if memory is not None:
                self.limited.add("memory_bytes")
        if self.pids is not None:
            count = None if pids is None else max(1, int(pids))
            if count != self._pids_set or not self._limits_known:
                _set(f"{self._pids_s}/pids.max", "max" if count is None else str(count))
                self._pids_set = count
            self.limited.discard("pids")
            if count is not None:
                self.limited.add("pids")
        self._limits_known = True

    def _write_memory(self, value: int | None) -> None:
        memory = self._memory_s
        if self._memory_v2 is None:  # (which files it has: looked up once)
            self._memory_v2 = os.path.exists(f"{memory}/memory.max")
            self._memsw = os.path.exists(f"{memory}/memory.swap.max" if self._memory_v2
                                         else f"{memory}/memory.memsw.limit_in_bytes")
        if self._memory_v2:
            _set(f"{memory}/memory.max", "max" if value is None else str(value))
            if self._memsw:
                _set(f"{memory}/memory.swap.max", "max" if value is None else "0")
        else:  # v1: memsw may never be below the memory limit, so the order matters
            text = "-1" if value is None else str(value)
            names = ["memory.limit_in_bytes"]
            if self._memsw:
                old = self._memory_set
                raising = value is None or (old is not None and value > old)
                names.insert(0 if raising else 1, "memory.memsw.limit_in_bytes")
            for name in names:
                _set(f"{memory}/{name}", text)
        self._memory_set = value

    def rename(self, name: str) -> None:
        """Give it ``name`` in every hierarchy that lets it (v1 only: v2 has no rename)."""
        for i, directory in enumerate(self.dirs):
            target = directory.with_name(name)
            try:
                directory.rename(target)
            except OSError:
                continue
            self.dirs[i] = target
            if self.memory == directory:
                self.memory = target
            if self.pids == directory:
                self.pids = target
        self._strings()

    def charged(self) -> int:
        """Bytes charged to its memory cgroup (0 without one)."""
        if self.memory is None:
            return 0
        for name in (self._charge_name,) if self._charge_name else (
                "memory.current", "memory.usage_in_bytes"):
            text = reaper._read(f"{self._memory_s}/{name}").strip()
            if text.isdigit():
                self._charge_name = name
                return int(text)
        return 0

    def empty(self) -> bool:
        """No process and no child cgroup in any of its directories (a kernfs
        directory's link count is 2 plus its subdirectories)."""
        try:
            return all(os.stat(d).st_nlink == 2 and not reaper._read(f"{d}/cgroup.procs")
                       .strip() for d in self._dirs_s)
        except OSError:
            return False

    def attach(self, pid: int) -> None:
        """Move process ``pid`` (and, on v2, all its threads) into this cgroup."""
        self.fresh = False
        for directory in self._dirs_s:
            _set(f"{directory}/cgroup.procs", str(pid))

    def oom_kills(self) -> int:
        """How many processes the OOM killer took in this cgroup so far (v2's
        ``memory.events`` or v1's ``memory.oom_control``: the one found first is kept)."""
        if self.memory is None or self.fresh:
            return 0
        for name in (self._oom_name,) if self._oom_name else ("memory.events",
                                                              "memory.oom_control"):
            for line in reaper._read(f"{self._memory_s}/{name}").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    self._oom_name = name
                    return int(value)
        return 0

    def pids_inside(self) -> list[int]:
        return reaper.cgroup_pids(self._dirs_s[0])

    def signal(self, signum: int) -> int:
        return reaper.signal_cgroup(self._dirs_s[0], signum)

    def kill(self) -> int:
        """SIGKILL everything in it until it is empty; how many were found."""
        return reaper.kill_cgroup(self._dirs_s[0])

    def remove(self) -> bool:
        """Kill what is left and remove its directories."""
        self.kill()
        ok = True
        for directory in self.dirs:
            ok = reaper.remove_cgroup(str(directory)) and ok
        return ok


def _set(path: str | Path, value: str) -> None:
    """One ``write`` of ``value`` (plain ``os`` calls: ``Path.write_text`` builds a text
    wrapper per call, and a job's session writes three ``cgroup.procs`` on v1)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as err:
        raise CgroupError(f"cannot write {value!r} to {path}: {err.strerror or err}") from err


class CgroupTree:
    """The cgroups of one worker run (see the module docstring). Made by ``create``;
    ``roots`` are what the reaper and the state file keep."""

    def __init__(self, layout: Layout, worker_id: str = "") -> None:
        if not layout.version or layout.tracker is None:
            raise CgroupError(f"no cgroups here: {layout.note}")
        self.layout = layout
        self.name = (f"xcloud-{safe_name(worker_id or 'worker')[:40]}-{os.getpid()}-"
                     f"{uuid.uuid4().hex[:6]}")
        # The hierarchies used, tracker first, each once (v2: one for everything).
        parents: list[Path] = []
        for parent in (layout.tracker, layout.memory, layout.pids):
            if parent is not None and parent not in parents:
                parents.append(parent)
        self.roots = [parent / self.name for parent in parents]
        self.memory = layout.memory / self.name if layout.memory else None
        self.pids = layout.pids / self.name if layout.pids else None
        self._pool: list[SessionCgroup] = []  # emptied session cgroups (release)
        self._pool_lock = threading.Lock()

    @property
    def version(self) -> int:
        return self.layout.version

    def create(self) -> CgroupTree:
        """Make the tree (CgroupError when the tracker cannot be made; a hierarchy that
        only limits falls back to rlimits with a warning)."""
        for root in list(self.roots):
            try:
                root.mkdir(mode=0o755)
            except OSError as err:
                if root == self.roots[0]:
                    raise CgroupError(f"cannot make cgroup {root}: {err.strerror}") from err
                log.warning("cannot make cgroup %s (%s); its limit falls back to an "
                            "rlimit", root, err.strerror)
                self.roots.remove(root)
                self.memory = None if self.memory == root else self.memory
                self.pids = None if self.pids == root else self.pids
        if self.version == 2:
            self._enable_v2_controllers()
        return self

    def _enable_v2_controllers(self) -> None:
        """Let the sessions below the tree have memory and pids limits, if the worker's
        own cgroup can pass them down (it cannot while it holds processes itself and is
        not the root: the no-internal-processes rule). Else rlimits."""
        root = self.roots[0]
        wanted = [c for c, d in (("memory", self.memory), ("pids", self.pids)) if d]
        if not wanted:
            return
        have = set(reaper._read(str(root / "cgroup.controllers")).split())
        missing = [c for c in wanted if c not in have]
        if missing:
            own = root.parent / "cgroup.subtree_control"
            with contextlib.suppress(OSError):
                own.write_text(" ".join(f"+{c}" for c in missing))
            have = set(reaper._read(str(root / "cgroup.controllers")).split())
        enabled = []
        for name in wanted:
            if name in have:
                try:
                    (root / "cgroup.subtree_control").write_text(f"+{name}")
                    enabled.append(name)
                except OSError as err:
                    log.debug("cannot enable %s below %s: %s", name, root, err)
        if "memory" not in enabled:
            self.memory = None
        if "pids" not in enabled:
            self.pids = None
        if len(enabled) < len(wanted):
            log.info("cgroup v2: %s not delegated to %s; those limits are rlimits",
                     ", ".join(c for c in wanted if c not in enabled), root.parent)

    def session(self, session_id: str, memory_bytes: int | None = None,
                pids: int | None = None) -> SessionCgroup:
        """A cgroup for session ``session_id`` with these limits: a pooled one when the
        pool has one and it takes them, else one made (CgroupError when it cannot be)."""
        name = f"s-{safe_name(session_id)}"
        while True:
            with self._pool_lock:
                pooled = self._pool.pop() if self._pool else None
            if pooled is None:
                break
            if self.version == 1:  # (v2 has no rename: no syscall made to fail per job)
                pooled.rename(name)
            try:
                pooled.set_limits(memory_bytes, pids)
                return pooled
            except CgroupError as err:  # e.g. a lower limit below what tmpfs still holds
                log.debug("pooled cgroup %s not reused: %s", pooled.tracker, err)
                pooled.remove()
        cgroup = self._make(name)
        try:
            cgroup.set_limits(memory_bytes, pids)
        except CgroupError:
            cgroup.remove()
            raise
        return cgroup

    def _make(self, name: str) -> SessionCgroup:
        """New directories named ``name`` (or ``name.N`` when another cgroup has it: one
        whose processes outlived its session is never shared)."""
        for attempt in range(NAME_TRIES):
            chosen = name if not attempt else f"{name}.{attempt}"
            dirs: list[Path] = []
            try:
                for root in self.roots:
                    (root / chosen).mkdir(mode=0o755)
                    dirs.append(root / chosen)
            except OSError as err:
                for directory in dirs:
                    reaper.remove_cgroup(str(directory))
                if err.errno == errno.EEXIST:
                    continue
                raise CgroupError(f"cannot make cgroup {root / chosen}: "
                                  f"{err.strerror}") from err
            return SessionCgroup(
                dirs, memory=self.memory / chosen if self.memory else None,
                pids=self.pids / chosen if self.pids else None, fresh=True)
        raise CgroupError(f"cannot make cgroup {self.roots[0] / name}: name taken")

    def release(self, cgroup: SessionCgroup) -> bool:
        """Kill what is left in a closed session's cgroup; keep it for the next session
        when it is then empty, holds little memory (``POOL_CHARGE_MAX``) and the pool has
        room, else remove it. True when it is empty (kept) or gone: nothing of the
        session survives."""
        clean = cgroup.empty()  # (the usual closed session's: nothing to kill)
        if not clean:
            cgroup.kill()
            clean = cgroup.empty()
        if clean and cgroup.charged() <= POOL_CHARGE_MAX:
            with self._pool_lock:
                if len(self._pool) < POOL_MAX:
                    cgroup.fresh = False  # processes ran in it: its OOM count is read
                    cgroup._limits_known = False  # and its limits written again
                    self._pool.append(cgroup)
                    return True
        return cgroup.remove()

    def remove(self) -> bool:
        """Kill everything in the tree and remove it (the pooled cgroups with it)."""
        with self._pool_lock:
            self._pool.clear()
        reaper.kill_cgroup(str(self.roots[0]))
        ok = True
        for root in self.roots:
            ok = reaper.remove_cgroup(str(root)) and ok
        return ok
