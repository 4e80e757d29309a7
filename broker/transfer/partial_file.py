"""The partial file of an incoming transfer: written at segment offsets, hashed as its
contiguous prefix grows, read back for the final check.

Apart from ``receiver.py`` (which decides what to write and when to acknowledge) because
this is only the file: a sparse file of the announced size, one descriptor opened lazily,
and a SHA-256 state that never holds more than one read chunk of it in memory.
"""

from __future__ import annotations

import contextlib
import os

from broker.transfer.errors import TransferRefused
from broker.transfer.inbound import Inbound
from broker.transfer.state import fsync_dir

READ_CHUNK = 1 << 20  # hash catch-up reads
CATCH_UP_STEP = 64 << 20  # hashed from disk per segment event at most (the rest at fin)


def create(t: Inbound) -> None:
    """Create (or truncate) ``t``'s file at its full size, sparse, and keep it open."""
    t.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(t.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, t.record.size)  # sparse: written at offsets as segments come
    except OSError:
        os.close(fd)
        raise
    t.fd = fd
    fsync_dir(t.path.parent)


def descriptor(t: Inbound) -> int:
    """``t``'s open file, opened again if it was closed (after a restart)."""
    if t.fd is None:
        t.fd = os.open(t.path, os.O_RDWR)
    return t.fd


def close(t: Inbound) -> None:
    fd, t.fd = t.fd, None
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def sync(t: Inbound, fsync: bool) -> None:
    """Make what was written durable (when ``fsync`` is on and the file is open)."""
    if fsync and t.fd is not None:
        os.fdatasync(t.fd)


def write_at(t: Inbound, offset: int, data: bytes) -> None:
    fd = descriptor(t)
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def hash_forward(t: Inbound, offset: int, data: bytes) -> None:
    """Extend the whole-file hash over the contiguous prefix: from memory when the
    segment is next in line, from disk when it filled a gap before later data."""
    if offset == t.hashed_to:
        t.hasher.update(data)
        t.hashed_to += len(data)
    if t.hashed_to < t.have.prefix_end():
        catch_up(t, CATCH_UP_STEP)


def catch_up(t: Inbound, limit: int | None) -> None:
    """Hash from disk up to the end of the contiguous prefix (``limit`` bytes at most)."""
    end = t.have.prefix_end()
    done = 0
    fd = descriptor(t)
    while t.hashed_to < end and (limit is None or done < limit):
        chunk = os.pread(fd, min(READ_CHUNK, end - t.hashed_to), t.hashed_to)
        if not chunk:
            raise OSError(f"{t.path} is shorter than the {end} bytes received")
        t.hasher.update(chunk)
        t.hashed_to += len(chunk)
        done += len(chunk)


def final_digest(t: Inbound, fsync: bool) -> str:
    """Sync, hash the rest and return the whole file's SHA-256 ("" if not all of it was
    hashed). Raises OSError when the file cannot be read back, and TransferRefused when
    it no longer has the announced size."""
    record = t.record
    sync(t, fsync)
    catch_up(t, None)
    if os.fstat(descriptor(t)).st_size != record.size:
        raise TransferRefused("hash_mismatch", f"{record.name}: the partial file "
                              "changed size; nothing was kept")
    return t.hasher.hexdigest() if t.hashed_to == record.size else ""
