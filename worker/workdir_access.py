"""Where in a work directory a client's path may lead, and who owns what we write there.

Apart from ``file_transfers.py`` (the transfer engine's sink and source) because this is
the confinement every path goes through: ``..`` is refused, an absolute path outside the
work directory too, the resolved path must stay inside (a symbolic link may point within
the work directory, never out of it), and directories are then opened one component at a
time without following links (``O_NOFOLLOW``, ``dir_fd``), so a command that swaps a
directory for a link between the check and the use gets an error, not another file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from broker.transfer import TransferRefused
from worker.exec_sessions import Session
from worker.executors.registry import workdir_access

OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def refuse(code: str, message: str) -> TransferRefused:
    """The refusal the peer gets, its message cut to what the wire carries."""
    return TransferRefused(code, message[:4000])


@dataclass(frozen=True)
class Handover:
    """How files written by the worker become the command's user's, and where commands
    see the work dir: what the session's driver says (``Executor.workdir_access``)."""

    uid: int | None = None  # chown to this uid:gid
    gid: int | None = None
    open: bool = False  # make them writable by everyone (the driver's "open" mode)
    mount: str | None = None  # the work dir as commands see it; None: its host path

    @classmethod
    def of(cls, session: Session) -> Handover:
        access = workdir_access(session.handle)
        return cls(uid=access.uid, gid=access.gid, open=access.open, mount=access.mount)

    def apply(self, path: str, *, dir_fd: int | None = None, is_dir: bool = False) -> None:
        """Hand ``path`` (one we just made) over to the container's user."""
        if self.open:
            current = stat.S_IMODE(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            os.chmod(path, current | (0o777 if is_dir else 0o666), dir_fd=dir_fd)
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid, dir_fd=dir_fd, follow_symlinks=False)

    def apply_tree(self, root: Path) -> None:
        """Hand over everything under ``root`` (a staging dir of ours) and ``root``."""
        if not self.open and self.uid is None:
            return
        for top, dirs, files in os.walk(root):
            for name in dirs:
                self.apply(os.path.join(top, name), is_dir=True)
            for name in files:
                full = os.path.join(top, name)
                if not os.path.islink(full):
                    self.apply(full)
                elif self.uid is not None and self.gid is not None:
                    os.chown(full, self.uid, self.gid, follow_symlinks=False)
        self.apply(str(root), is_dir=True)


def relative_path(path: str, workdir: Path, mount: str | None) -> PurePosixPath:
    """``path`` as given by a client, relative to the work directory (which commands
    may also know as ``mount``); refused when it is absolute outside it or climbs with
    ``..``."""
    if "\x00" in path:
        raise refuse("invalid", "a path cannot contain NUL characters")
    p = PurePosixPath(path)
    if p.is_absolute():
        bases = [PurePosixPath(mount)] if mount else []
        bases.append(PurePosixPath(os.path.realpath(workdir)))
        bases.append(PurePosixPath(workdir))
        for base in bases:
            if p == base or base in p.parents:
                p = p.relative_to(base)
                break
        else:
            raise refuse("forbidden", f"{path}: absolute paths outside the work directory "
                          "are refused; give a path relative to it")
    if ".." in p.parts:
        raise refuse("forbidden", f"{path}: `..` is refused; paths stay inside the work "
                      "directory")
    return p


def resolve_inside(workdir: Path, rel: PurePosixPath, shown: str) -> list[str]:
    """The components of ``rel`` once resolved (links followed), which must still lie
    inside the work directory; [] is the work directory itself."""
    root = os.path.realpath(workdir)
    real = os.path.realpath(os.path.join(root, *rel.parts))
    if real != root and not real.startswith(root + os.sep):
        raise refuse("forbidden", f"{shown}: leads outside the work directory (through a "
                      "symbolic link); refused")
    if real == root:
        return []
    return os.path.relpath(real, root).split(os.sep)


def open_dirs(workdir: Path, parts: Iterable[str], *, create: bool, handover: Handover,
              shown: str) -> int:
    """An fd of the directory ``parts`` below ``workdir``, opened one component at a
    time without following links (created when missing, with ``create``)."""
    fd = os.open(workdir, OPEN_DIR)
    try:
        for part in parts:
            try:
                nxt = os.open(part, OPEN_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise refuse("not_found", f"{shown}: no such directory") from None
                os.mkdir(part, 0o755, dir_fd=fd)
                handover.apply(part, dir_fd=fd, is_dir=True)
                nxt = os.open(part, OPEN_DIR, dir_fd=fd)
            except (NotADirectoryError, OSError) as err:
                raise refuse("forbidden", f"{shown}: {part} is not a directory (or is a "
                              f"link that changed): {err.strerror}") from None
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd



def place_file(partial: Path, workdir: Path, parts: list[str], *, mode: int,
               handover: Handover, shown: str, durable: bool) -> None:
    """Move ``partial`` (a finished file of ours) to ``parts`` below ``workdir`` with
    ``mode``, handed over, through directories opened without following links; refused
    when a directory stands there now. ``durable`` fsyncs the directory after."""
    os.chmod(partial, mode)
    handover.apply(str(partial))
    fd = open_dirs(workdir, parts[:-1], create=True, handover=handover, shown=shown)
    try:
        try:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                raise refuse("conflict", f"{shown} is a directory now")
        os.replace(partial, parts[-1], dst_dir_fd=fd)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
