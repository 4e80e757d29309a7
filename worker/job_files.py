"""The files of one job attempt: inputs placed into its work dir, its stdout and stderr
captured (capped), its outputs collected by glob.

Inputs come from the worker's input cache (worker/input_cache.py) and are *copied* under
their names (a copy, not a hard link: a job that rewrote an input in place would
otherwise corrupt the shared cache; the kernel copies with ``copy_file_range``). Names are
relative, never ``..``, never through a symlink the job could have planted. Outputs are
the regular files (not symlinks, not the ``.xcloud*`` files of the worker and its
executors) under the work dir that match the spec's globs, at most
``MAX_OUTPUTS``; each is hard-linked (or copied) out of the work dir into the attempt's
``outputs/`` before the work dir goes, so an upload interrupted by a worker restart
resumes from there.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from schemas.outcome import ERROR_MAX
from worker.errors import WorkerError
from worker.executors.base import ExitResult

log = logging.getLogger(__name__)

MAX_OUTPUTS = 256
DATA_NAME_MAX = 255  # a data object's name: "<job>/outputs/<name>" must fit
STDIN_NAME = ".xcloud-stdin"  # in the work dir; the command reads it as its stdin
PRIVATE = ".xcloud"  # stdin and the executors' own files (.xcloud/): never outputs


class JobFileError(WorkerError):
    code = "invalid"


def safe_relative(name: str) -> PurePosixPath:
    """``name`` as a relative path inside a work dir; JobFileError otherwise."""
    path = PurePosixPath(name)
    if (not name or "\0" in name or path.is_absolute() or ".." in path.parts
            or path.parts == () or str(path) in (".", "")):
        raise JobFileError(f"not a relative file name: {name[:255]!r}")
    return path


def place(source: Path, workdir: Path, name: str, *, executable: bool = False) -> Path:
    """Copy ``source`` to ``workdir/name`` (parents created, readable by a container
    user; ``executable``: an app's binary, flagged ``exec`` by the coordinator, not
    guessed from its name); refuses a destination that goes through a symlink."""
    rel = safe_relative(name)
    current = workdir
    for part in rel.parts[:-1]:
        current = current / part
        try:
            st = current.lstat()
        except FileNotFoundError:
            current.mkdir(mode=0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise JobFileError(f"input {name!r}: {current.name} is not a directory")
    dest = current / rel.parts[-1]
    if dest.is_symlink() or dest.is_dir():
        raise JobFileError(f"input {name!r} collides with an existing entry")
    shutil.copyfile(source, dest)
    os.chmod(dest, 0o755 if executable else 0o644)
    return dest


class Capture:
    """One output stream written to a file, up to ``cap`` bytes (the rest is counted).

    The file is made at the first byte: most short jobs write nothing to one stream or
    both, and an absent file is an empty stream to every reader (uploads, follows)."""

    def __init__(self, path: Path, cap: int) -> None:
        self.path = path
        self.cap = max(0, cap)
        self.written = 0
        self.total = 0
        self._lock = threading.Lock()
        self._fh: BinaryIO | None = None
        self._closed = False

    @property
    def truncated(self) -> bool:
        return self.total > self.written

    def write(self, data: bytes) -> None:
        with self._lock:
            self.total += len(data)
            room = self.cap - self.written
            if room <= 0 or self._closed or not data:
                return
            if self._fh is None:
                self._fh = open(self.path, "wb")  # noqa: SIM115 - closed in close()
            chunk = data[:room]
            self._fh.write(chunk)
            self.written += len(chunk)
            self._fh.flush()  # followers read the file while the command runs (job_follow)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fh is not None:
                self._fh.close()


class Captures:
    """stdout and stderr of one attempt; ``feed`` is the executor's ``OutputSink``."""

    def __init__(self, directory: Path, cap: int) -> None:
        self.stdout = Capture(directory / "stdout", cap)
        self.stderr = Capture(directory / "stderr", cap)

    def feed(self, stream: str, data: bytes) -> None:
        (self.stderr if stream == "stderr" else self.stdout).write(data)

    def close(self) -> None:
        self.stdout.close()
        self.stderr.close()

    @property
    def truncated(self) -> bool:
        return self.stdout.truncated or self.stderr.truncated

    @property
    def total(self) -> int:
        return self.stdout.total + self.stderr.total


@dataclass(frozen=True)
class Collected:
    name: str  # relative to the work dir
    path: Path  # the copy under outputs/


def collect_outputs(workdir: Path, patterns: list[str], dest: Path) -> tuple[
        list[Collected], list[str]]:
    """The files matching ``patterns`` linked or copied into ``dest``; returns them and
    the problems met (skipped entries), for the report's error."""
    found: dict[str, Path] = {}
    problems: list[str] = []
    if not patterns:  # most jobs: not even the work dir's realpath (a stat per component)
        return [], problems
    root = workdir.resolve()
    for pattern in patterns:
        try:
            safe_relative(pattern)
            matches = sorted(root.glob(pattern))
        except (JobFileError, ValueError, OSError) as err:
            problems.append(f"output {pattern!r}: {err}")
            continue
        for match in matches:
            rel = match.relative_to(root).as_posix()
            if rel in found or rel.startswith(PRIVATE) or _escapes(root, match):
                continue
            try:
                st = match.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if len(found) >= MAX_OUTPUTS:
                problems.append(f"more than {MAX_OUTPUTS} outputs; the rest were dropped")
                break
            found[rel] = match
    if not found:  # most jobs: no directory made and removed for nothing (an inode each)
        return [], problems
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    collected: list[Collected] = []
    for index, (rel, src) in enumerate(sorted(found.items())):
        target = dest / str(index)
        try:
            if target.exists():
                target.unlink()
            try:
                os.link(src, target, follow_symlinks=False)
            except OSError:
                shutil.copyfile(src, target, follow_symlinks=False)
        except OSError as err:
            problems.append(f"output {rel!r}: {err.strerror or err}")
            continue
        collected.append(Collected(rel, target))
    return collected, problems


def _escapes(root: Path, match: Path) -> bool:
    """Does ``match`` (or a directory on its way) lead out of ``root`` via a symlink?"""
    rel = match.relative_to(root)
    current = root
    for part in rel.parts[:-1]:
        current = current / part
        if current.is_symlink():
            return True
    return False


def outputs_wire(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's ``outputs``: name, sha256, size of each uploaded file."""
    return [{"name": f["name"], "sha256": f["sha256"], "size": int(f["size"])}
            for f in files if f.get("sha256")]


def attempt_outcome(*, job: str, spec: dict[str, Any], result: ExitResult, timed_out: bool,
                    kill_reason: str | None, captures: Captures, workdir: Path,
                    outputs_dir: Path) -> dict[str, Any]:
    """How an attempt ended, for its report: the kind, the exit facts, and the outputs
    collected out of ``workdir`` into ``outputs_dir`` (none for a cancelled attempt)."""
    if kill_reason is not None:
        kind = "cancelled"
    elif timed_out or result.timed_out:
        kind = "wall_clock"
    elif result.oom_killed:
        kind = "oom"
    elif result.exit_code == 0 and not result.error:
        kind = "success"
    else:
        kind = "exit_nonzero"
    problems: list[str] = []
    outputs: list[dict[str, Any]] = []
    if kind != "cancelled":
        collected, problems = collect_outputs(
            workdir, [str(p) for p in spec.get("outputs") or []], outputs_dir)
        room = DATA_NAME_MAX - len(f"{job}/outputs/")
        for item in collected:
            if len(item.name) > min(room, 255):
                problems.append(f"output {item.name[:64]!r}…: name too long")
                continue
            outputs.append({"name": item.name, "path": str(item.path)})
    error = result.error or kill_reason
    if timed_out:
        error = error or f"wall clock of {spec.get('wall_s')} s exceeded"
    if problems:
        error = "; ".join([*([error] if error else []), *problems])
    return {
        "kind": kind, "exit_code": result.exit_code, "signal": result.signal,
        "duration_s": max(0.0, float(result.duration_s)),
        "timed_out": timed_out or result.timed_out, "oom_killed": result.oom_killed,
        "truncated": captures.truncated, "output_bytes": captures.total,
        "error": error[:ERROR_MAX] if error else None, "outputs": outputs,
    }
