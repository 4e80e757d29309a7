"""Directories in and out of a work directory without following a link: packed into a
tar by a walk that never follows one, and merged in from our staging directory.

Apart from ``file_transfers.py`` because this is the tree walking alone; which directory
may be read or written is decided there (``workdir_access.py``).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

from worker.workdir_access import OPEN_DIR, OPEN_FILE, refuse


def copy_fd(fd: int, dest: Path) -> None:
    """Copy the open file ``fd`` to ``dest`` (through a temporary beside it)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        while True:
            chunk = os.pread(fd, 1 << 20, offset)
            if not chunk:
                break
            os.write(out, chunk)
            offset += len(chunk)
    finally:
        os.close(out)
    os.replace(tmp, dest)


def _entries(fd: int) -> Iterator[tuple[str, os.stat_result]]:
    for name in sorted(os.listdir(fd)):
        with contextlib.suppress(FileNotFoundError):
            yield name, os.stat(name, dir_fd=fd, follow_symlinks=False)


def pack_dir(tar: tarfile.TarFile, fd: int, prefix: str) -> None:
    """Add the tree below the directory ``fd`` to ``tar`` without following a link:
    files, directories and symbolic links (as links); nothing else."""
    for name, st in _entries(fd):
        arcname = f"{prefix}{name}"
        info = tarfile.TarInfo(arcname)
        info.mode = stat.S_IMODE(st.st_mode)
        info.mtime = int(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, OPEN_DIR, dir_fd=fd)
            except OSError:
                continue  # it changed under us
            try:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                pack_dir(tar, sub, f"{arcname}/")
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            try:
                ffd = os.open(name, OPEN_FILE, dir_fd=fd)
            except OSError:
                continue
            with os.fdopen(ffd, "rb") as fh:
                info.size = os.fstat(ffd).st_size
                tar.addfile(info, fh)
        elif stat.S_ISLNK(st.st_mode):
            with contextlib.suppress(OSError):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(name, dir_fd=fd)
                tar.addfile(info)


def merge_into(src: Path, dst_fd: int, shown: str) -> None:
    """Move the tree ``src`` (our staging directory) into the directory ``dst_fd``:
    existing files are replaced, existing directories merged, nothing followed."""
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        try:
            st: os.stat_result | None = os.stat(entry.name, dir_fd=dst_fd,
                                                follow_symlinks=False)
        except FileNotFoundError:
            st = None
        here_dir = st is not None and stat.S_ISDIR(st.st_mode)
        if entry.is_dir(follow_symlinks=False) and here_dir:
            sub = os.open(entry.name, OPEN_DIR, dir_fd=dst_fd)
            try:
                merge_into(Path(entry.path), sub, shown)
            finally:
                os.close(sub)
            continue
        if here_dir:
            raise refuse("conflict", f"{shown}: {entry.name} is a directory on the worker "
                          "and a file in what was sent")
        os.replace(entry.path, entry.name, dst_dir_fd=dst_fd)
