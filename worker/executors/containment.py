"""How the process executor keeps a worker's commands from outliving what they belong to.

Two parts (docs/exec.md, "Containment"):

- a cgroup per session, when the machine gives the worker one (worker/executors/cgroups.py):
  closing the session kills the whole cgroup, whatever its processes did (``setsid``,
  scrubbed ``XCLOUD_*`` markers, double forks), and its memory and pids limits bind the
  session as a whole;
- the reaper (worker/executors/reaper.py), started with the first session: when the
  worker exits, even by ``kill -9``, it kills the worker's cgroup tree (or, without
  cgroups, the recorded process groups and sessions and the marked processes) at once.

A restarted worker also removes the trees that earlier runs recorded in its state dir
(``cleanup_left``), in case their reaper died with them.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from worker.executors.base import Limits
from worker.executors.cgroup_records import forget_tree, record_tree, remove_left_trees
from worker.executors.cgroups import CgroupError, CgroupTree, Layout, SessionCgroup, detect
from worker.executors.reaper import Reaper

log = logging.getLogger(__name__)


class Containment:
    """The cgroups and the reaper of one process executor. Thread-safe; nothing is made
    before the first session (``session``) so an idle worker costs nothing."""

    def __init__(self, state_dir: Path, records_dir: Path, mode: str = "auto",
                 worker_id: str = "") -> None:
        self.state_dir = state_dir
        self.records_dir = records_dir
        self.worker_id = worker_id
        self.layout: Layout = detect(mode)
        self._lock = threading.Lock()
        self._started = False
        self._tree: CgroupTree | None = None
        self._reaper: Reaper | None = None
        self._sessions: dict[str, SessionCgroup] = {}

    @property
    def mode(self) -> str:
        """``cgroup v2``, ``cgroup v1`` or ``none``."""
        return self.layout.mode

    @property
    def tree(self) -> CgroupTree | None:
        return self._tree

    @property
    def reaper_pid(self) -> int | None:
        return self._reaper.pid if self._reaper is not None else None

    def describe(self) -> str:
        return self.layout.describe()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Make this run's cgroup tree and start the reaper (once)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            if self.layout.version:
                try:
                    self._tree = CgroupTree(self.layout, self.worker_id).create()
                except CgroupError as err:
                    log.warning("process executor: %s; falling back to process groups, "
                                "sessions and markers", err)
                    self.layout = Layout(note=str(err))
                else:
                    record_tree(self.state_dir, self._tree)
            if self._tree is not None:
                reaper = Reaper([str(root) for root in self._tree.roots])
            else:
                reaper = Reaper([], records=str(self.records_dir),
                                marked=str(self.state_dir.resolve()))
            try:
                reaper.start()
            except OSError as err:
                log.error("cannot start the reaper (%s): commands will outlive a worker "
                          "killed with -9 until it restarts", err)
                return
            self._reaper = reaper
            log.info("process executor: reaper pid %s; %s", reaper.pid, self.describe())

    def close(self) -> None:
        """Kill what is left in this run's cgroups, remove them, let the reaper go."""
        with self._lock:
            tree, reaper = self._tree, self._reaper
            self._sessions.clear()
            self._tree = self._reaper = None
        if tree is not None:
            if not tree.remove():
                log.warning("cannot remove cgroup tree %s", tree.name)
            forget_tree(self.state_dir, tree)
        if reaper is not None:
            reaper.stop()

    def cleanup_left(self) -> int:
        """Kill and remove the cgroup trees earlier runs left; how many processes."""
        with self._lock:
            keep = self._tree
        return remove_left_trees(self.state_dir, keep=keep)

    # -- sessions --------------------------------------------------------------------

    def session(self, session_id: str, limits: Limits) -> SessionCgroup | None:
        """The cgroup of a session (with ``limits``: a pooled one, or one made, when it
        has none yet); None without cgroups. CgroupError when it cannot be had."""
        self.start()
        with self._lock:
            tree = self._tree
            known = self._sessions.get(session_id)
            if tree is None or known is not None:
                return known
            cgroup = tree.session(session_id, limits.memory_bytes, limits.pids)
            self._sessions[session_id] = cgroup
            return cgroup

    def existing(self, session_id: str) -> SessionCgroup | None:
        """The session's cgroup if it has one. Only this run's sessions can: each run
        makes a tree of its own, and a session's cgroup is in ``_sessions`` from when it
        is had until ``drop``."""
        with self._lock:
            return self._sessions.get(session_id)

    def drop(self, session_id: str) -> bool:
        """Kill what is left in the session's cgroup and give it back to the tree (kept
        for the next session when empty, else removed).

        True when the session had a cgroup and it is empty or gone: a cgroup that still
        holds a process can be neither, so nothing of the session survives anywhere.
        """
        with self._lock:
            cgroup = self._sessions.pop(session_id, None)
            tree = self._tree
        if cgroup is None:
            return False
        if tree.release(cgroup) if tree is not None else cgroup.remove():
            return True
        log.warning("cannot empty cgroup %s", cgroup.tracker)
        return False
