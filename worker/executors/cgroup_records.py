"""The cgroup trees of this worker's runs, recorded in ``<state_dir>/cgroups.json`` when
made (worker/executors/cgroups.py), so that a restarted worker kills and removes what a
previous run left even if its own cgroup changed (worker/executors/containment.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from worker.executors import reaper
from worker.executors.cgroups import STATE_FILE, CgroupTree

log = logging.getLogger(__name__)


def _load(state_dir: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        log.warning("unreadable %s: %s", state_dir / STATE_FILE, err)
        return []
    trees = data.get("trees") if isinstance(data, dict) else None
    return [t for t in trees or [] if isinstance(t, dict) and isinstance(t.get("roots"), list)]


def _save(state_dir: Path, trees: list[dict[str, Any]]) -> None:
    path = state_dir / STATE_FILE
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"trees": trees}))
    os.replace(tmp, path)


def record_tree(state_dir: Path, tree: CgroupTree) -> None:
    """Remember ``tree`` in the state dir (for a restarted worker)."""
    trees = _load(state_dir)
    trees.append({"name": tree.name, "roots": [str(r) for r in tree.roots]})
    try:
        _save(state_dir, trees)
    except OSError as err:
        log.warning("cannot record cgroup tree %s: %s", tree.name, err)


def forget_tree(state_dir: Path, tree: CgroupTree) -> None:
    trees = [t for t in _load(state_dir) if t.get("name") != tree.name]
    with contextlib.suppress(OSError):
        _save(state_dir, trees)


def remove_left_trees(state_dir: Path, keep: CgroupTree | None = None) -> int:
    """Kill and remove the trees previous runs recorded in ``state_dir`` (all but
    ``keep``); how many processes were killed. Only ``xcloud-*`` directories below a
    cgroup file system are touched, whatever the file says."""
    killed = 0
    left: list[dict[str, Any]] = []
    for tree in _load(state_dir):
        if keep is not None and tree.get("name") == keep.name:
            left.append(tree)
            continue
        roots = [Path(str(r)) for r in tree["roots"]]
        if not all(_is_our_cgroup(r) for r in roots):
            log.warning("ignoring a recorded cgroup tree outside a cgroup file system: %s",
                        roots)
            continue
        if roots and roots[0].is_dir():
            killed += reaper.kill_cgroup(str(roots[0]))
        for root in roots:
            if not reaper.remove_cgroup(str(root)):
                log.warning("cannot remove cgroup %s", root)
                left.append(tree)
                break
    with contextlib.suppress(OSError):
        _save(state_dir, left)
    return killed


def _is_our_cgroup(path: Path) -> bool:
    """Is ``path`` one of our tree roots (by name) and a cgroup (or gone already)?"""
    if not path.is_absolute() or ".." in path.parts or not path.name.startswith("xcloud-"):
        return False
    return not path.exists() or (path / "cgroup.procs").is_file()
