"""Copying files to and from a reserved worker's work directory: ``ReservedWorker.put``
/ ``.get``, the shell's ``put`` / ``get`` and ``xcloud cp`` (docs/transfer.md, "Files on
a reservation").

The bytes travel over the transfer protocol (broker/transfer/) between the client's
endpoint (``Grid.transfers``) and the worker's, under the reservation's grant; the
worker checks it and keeps every path inside the work directory (worker/file_transfers.py).
A directory travels as an uncompressed tar: packed here into a temporary file before an
upload; after a download unpacked with tarfile's ``data`` filter (no absolute or ``..``
members, no links out, no device files). As ``cp`` does, a file or directory copied
into an existing directory keeps its own name there.

Everything raised here is a ``ClientError``: a refusal is a ``Refused`` with the
worker's code and words, a local file problem a ``CopyError``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, cast

from broker.transfer import Peer, TransferError, TransferRefused
from client.errors import ClientError, Unreachable
from client.reservation import Refused, ReservationLost

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from broker.config import Config
    from broker.transfer import TransferEndpoint
    from client.api import Grid
    from client.data import DataRef
    from client.reservation import ReservedWorker

log = logging.getLogger(__name__)

KIND = "workdir"
# What the worker says when a fetch without tar names a directory (worker/file_transfers.py
# DIRECTORY_REFUSAL; the client does not import the worker): fetch it again as a tar.
DIRECTORY_REFUSAL = "is a directory"
DATA_PREFIX = "data:"  # `put data:REF`, `xcloud cp data:REF W:PATH`: a stored data object
# A placement's request timeout: the worker fetches the object first (20 MB/s is slow).
DATA_BASE_TIMEOUT_S = 10.0
DATA_RATE_BPS = 20e6

class CopyError(ClientError):
    """A local file problem (missing source, unwritable destination, bad archive)."""

    code = "invalid"


@dataclass(frozen=True)
class CopyResult:
    """What one copy moved: ``remote`` as the worker named it, bytes on the wire."""

    local: Path
    remote: str
    size: int
    sha256: str
    directory: bool
    elapsed_s: float

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.size / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _endpoint(handle: ReservedWorker) -> TransferEndpoint:
    grid = handle._grid
    endpoint: TransferEndpoint | None = getattr(grid, "transfers", None)
    if endpoint is None:
        raise ClientError("this connection cannot copy files (it has no transfer endpoint)")
    return endpoint


def _peer(handle: ReservedWorker) -> Peer:
    return Peer.worker(handle._grid.topics, handle.worker)


@contextlib.contextmanager
def _translated(handle: ReservedWorker, what: str) -> Iterator[None]:
    """Transfer and file-system errors as the client's errors, in words."""
    try:
        yield
    except TransferRefused as err:
        if handle.ended:
            raise ReservationLost(handle.id, handle.ended_reason or "ended") from err
        raise Refused(f"cannot {what}: {err}", err.code) from err
    except TransferError as err:
        if handle.ended:
            raise ReservationLost(handle.id, handle.ended_reason or "ended") from err
        raise Unreachable(f"cannot {what}: {err}") from err
    except OSError as err:
        name = f"{err.filename}: " if err.filename else ""
        raise CopyError(f"cannot {what}: {name}{err.strerror or err}") from err


def put(handle: ReservedWorker, local: str | os.PathLike[str], remote: str | None = None, *,
        progress: Callable[[int, int], None] | None = None) -> CopyResult:
    """Copy the local file or directory ``local`` to ``remote`` in the work directory
    (default: its own name there; into an existing directory: under its own name)."""
    handle._check()
    src = Path(local)
    if not src.exists():
        raise CopyError(f"{src}: no such file or directory")
    name = src.resolve().name or "root"
    target = remote if remote else name
    what = f"copy {src} to {handle.worker_name}:{target}"
    endpoint, peer = _endpoint(handle), _peer(handle)
    started = time.monotonic()
    with _translated(handle, what):
        purpose: dict[str, Any] = {"kind": KIND, "grant": handle.grant, "path": target}
        if src.is_dir():
            with tempfile.TemporaryDirectory(prefix="xcloud-put-") as tmp:
                packed = Path(tmp) / f"{name}.tar"
                with tarfile.open(packed, "w", format=tarfile.PAX_FORMAT) as tar:
                    for child in sorted(src.iterdir()):
                        tar.add(child, arcname=child.name)
                result = endpoint.upload(peer, packed, purpose={**purpose, "tar": True},
                                         name=name, progress=progress)
            directory = True
        else:
            purpose["mode"] = src.stat().st_mode & 0o777
            result = endpoint.upload(peer, src, purpose=purpose, name=name,
                                     progress=progress)
            directory = False
    where = str(result.ref.get("path") or target)
    log.info("put %s to %s:%s (%d bytes)", src, handle.worker, where, result.size)
    return CopyResult(src, where, result.size, result.sha256, directory,
                      time.monotonic() - started)


@dataclass(frozen=True)
class DataPlacement:
    """A data object placed in the work directory: where, how big, and whether the worker
    held it already (``cached``: nothing was fetched)."""

    sha256: str
    size: int
    remote: str
    cached: bool
    elapsed_s: float


def data_timeout(size: int, floor: float = 0.0) -> float:
    """Seconds to wait for a placement of ``size`` bytes (at least ``floor``)."""
    return max(floor, DATA_BASE_TIMEOUT_S + max(0, size) / DATA_RATE_BPS)


def put_data(handle: ReservedWorker, ref: DataRef | str, remote: str | None = None, *,
             owner: str | None = None) -> DataPlacement:
    """Place the data object ``ref`` (a ``DataRef``, a name, a hash or a unique hash
    prefix, as ``xcloud data get`` takes) at ``remote`` in the work directory (default:
    its name there; into an existing directory: under its name). The worker fetches it
    from the coordinator through its input cache, which jobs share: nothing moves through
    this machine, and an object the worker holds already is not fetched again."""
    from client.data import DataRef, DataStore
    from schemas.transfer_messages import WorkdirFetch

    handle._check()
    grid = cast("Grid", handle._grid)  # a handle's link is the Grid that reserved it
    found = ref if isinstance(ref, DataRef) else DataStore(grid).show(ref, owner=owner)
    name = (PurePosixPath(found.name).name or found.sha256)[:255]
    target = remote or name
    started = time.monotonic()
    limit = data_timeout(found.size, handle._grid.config.bus.request_timeout_s)
    reply = handle._request(WorkdirFetch(reservation=handle.id, grant=handle.grant,
                                         sha256=found.sha256, path=target, name=name),
                            timeout=limit)
    detail = getattr(reply, "detail", None) or {}
    where = str(detail.get("path") or target)
    log.info("placed data %s… at %s:%s", found.sha256[:12], handle.worker, where)
    return DataPlacement(found.sha256, int(detail.get("size") or found.size), where,
                         bool(detail.get("cached")), time.monotonic() - started)


def _local_target(remote: str, local: str | os.PathLike[str] | None) -> Path:
    base = PurePosixPath(remote).name
    if local is None:
        return Path(base or ".")
    dest = Path(local)
    if dest.is_dir() and base:
        return dest / base
    return dest


def get(handle: ReservedWorker, remote: str, local: str | os.PathLike[str] | None = None, *,
        progress: Callable[[int, int], None] | None = None) -> CopyResult:
    """Copy ``remote`` (a file or directory of the work directory) to ``local`` (default:
    its own name here; into an existing directory: under its own name)."""
    handle._check()
    if not remote:
        raise CopyError("name the remote file or directory")
    dest = _local_target(remote, local)
    what = f"copy {handle.worker_name}:{remote} to {dest}"
    endpoint, peer = _endpoint(handle), _peer(handle)
    source: dict[str, Any] = {"kind": KIND, "grant": handle.grant, "path": remote}
    started = time.monotonic()
    with _translated(handle, what):
        if dest.is_dir():
            directory = True
        else:
            try:
                result = endpoint.download(peer, source, dest, progress=progress)
                return CopyResult(dest, remote, result.size, result.sha256, False,
                                  time.monotonic() - started)
            except TransferRefused as err:
                if err.code != "conflict" or DIRECTORY_REFUSAL not in str(err):
                    raise
            directory = True
        nonce = uuid.uuid4().hex[:16]
        dest.parent.mkdir(parents=True, exist_ok=True)
        packed = dest.parent / f".{dest.name or 'dir'}.{nonce}.tar"
        try:
            result = endpoint.download(peer, {**source, "tar": True, "name": nonce}, packed,
                                       tid=f"get-{nonce}", progress=progress)
            _unpack(packed, dest)
        finally:
            _remove_download(packed)
    return CopyResult(dest, remote, result.size, result.sha256, directory,
                      time.monotonic() - started)


def _remove_download(packed: Path) -> None:
    """The archive of a directory download and, had it failed, its partial file and
    state (a directory download is never resumed: each one packs afresh)."""
    packed.unlink(missing_ok=True)
    prefix = f".{packed.name}."
    with contextlib.suppress(OSError):
        for leftover in packed.parent.iterdir():
            if leftover.name.startswith(prefix):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)


def _unpack(packed: Path, dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise CopyError(f"{dest} exists and is not a directory")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(packed, "r:") as tar:
            tar.extractall(dest, filter="data")
    except tarfile.TarError as err:
        raise CopyError(f"the directory sent by the worker cannot be unpacked safely into "
                        f"{dest}: {err}") from err


# -- progress on a terminal ----------------------------------------------------------------


class ProgressBar:
    """``name  42%  12.0/28.6 MiB  35.1 MiB/s  ETA 0:01`` on ``stream``, redrawn at most
    every 0.1 s; nothing when ``stream`` is not a terminal (a pipe, a file)."""

    def __init__(self, name: str, stream: IO[str] | None = None) -> None:
        self.name = name
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self._drawn = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._drawn < 0.1:
            return
        self._drawn = now
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        pct = 100.0 if total == 0 else 100.0 * done / total
        eta = (total - done) / rate if rate > 0 else math.inf
        eta_text = "--:--" if math.isinf(eta) else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        mib = 1 << 20
        self.stream.write(f"\r{self.name[:40]}  {pct:3.0f}%  {done / mib:.1f}/"
                          f"{total / mib:.1f} MiB  {rate / mib:.1f} MiB/s  ETA {eta_text} ")
        self.stream.flush()

    def finish(self) -> None:
        """End the bar's line (when one was drawn)."""
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


# -- xcloud cp ---------------------------------------------------------------------------


def split_remote(arg: str) -> tuple[str, str] | None:
    """``WORKER:PATH`` -> (worker, path); None for a local path (no colon, or a slash
    before the first colon: ``./a:b``)."""
    head, colon, tail = arg.partition(":")
    if not colon or "/" in head:
        return None
    return head, tail


def _held_on(grid: Grid, worker: str) -> dict[str, Any] | None:
    """The active reservation this principal holds (in any session) on ``worker`` (an
    id, a name, a listing index; "" = the only one it holds)."""
    rows = [r for r in grid.reservations() if r.get("state") in (None, "active")]
    if not worker:
        if len(rows) > 1:
            names = ", ".join(str(r.get("worker_name") or r["worker"]) for r in rows)
            raise ClientError(f"you hold several reservations ({names}): name the worker "
                              "(WORKER:PATH)")
        return rows[0] if rows else None
    wid = grid.resolve_index(int(worker)) if worker.isdigit() else worker
    for row in rows:
        if wid in (row.get("worker"), row.get("worker_name")):
            return row
    return None


def adopt(grid: Grid, reservation: str) -> ReservedWorker:
    """A handle on a reservation this principal holds in another session (a shell, a
    program): a fresh grant, no renewals of its own, never released from here."""
    from client.reservation import ReservedWorker
    from schemas.messages import Renew

    reply = grid.ask(Renew(reservation=reservation), what=f"use reservation {reservation}")
    return ReservedWorker(grid, reply, grid.config.client.lease_s)


def run_cp(config: Config, src: str, dst: str, *, wait: float | None = None,
           lease_s: float | None = None, stderr: IO[str] | None = None) -> int:
    """``xcloud cp SRC DST``: one side ``WORKER:PATH``. A reservation you hold on that
    worker (a shell, a program) is used and kept; otherwise the worker is reserved for
    the copy alone, as ``xcloud run`` does, and its work directory goes with it."""
    from client.api import Grid

    err = stderr if stderr is not None else sys.stderr
    data_ref = src[len(DATA_PREFIX):] if src.startswith(DATA_PREFIX) else None
    remote_src, remote_dst = split_remote(src), split_remote(dst)
    if data_ref is not None:
        if not data_ref or remote_dst is None:
            err.write("xcloud cp: error: data:REF goes to a worker: xcloud cp data:REF "
                      "WORKER:PATH\n")
            return 2
        remote_src = None
    if (remote_src is None) == (remote_dst is None):
        err.write("xcloud cp: error: exactly one of SRC and DST is WORKER:PATH "
                  "(xcloud cp ./in.dat w1:in.dat, xcloud cp w1:out ./out)\n")
        return 2
    worker, path = remote_src or remote_dst or ("", "")
    with Grid.connect(config) as grid:
        row = _held_on(grid, worker)
        if row is not None:
            handle = adopt(grid, str(row["id"]))
            return _copy(handle, src, dst, remote_dst, path, err)
        if not worker:
            raise ClientError("you hold no reservation: name a worker (WORKER:PATH)")
        target: str | int = int(worker) if worker.isdigit() else worker
        with grid.reserve(target, lease_s=lease_s, wait=wait) as handle:
            err.write(f"xcloud cp: note: {handle.worker_name} is reserved for this copy only; "
                      "its work directory goes when the copy ends (hold a reservation, e.g. "
                      "in `xcloud shell`, to keep files between commands)\n")
            return _copy(handle, src, dst, remote_dst, path, err)


def _copy(handle: ReservedWorker, src: str, dst: str, remote_dst: tuple[str, str] | None,
          path: str, err: IO[str]) -> int:
    if src.startswith(DATA_PREFIX) and remote_dst is not None:
        placed = put_data(handle, src[len(DATA_PREFIX):], path or None)
        err.write(f"placed {placed.sha256[:12]}… at {handle.worker_name}:{placed.remote} "
                  f"({placed.size} bytes{', cached' if placed.cached else ''})\n")
        return 0
    bar = ProgressBar(Path(src).name if remote_dst else PurePosixPath(path).name or path,
                      err)
    try:
        if remote_dst is not None:
            put(handle, src, path or None, progress=bar)
        else:
            get(handle, path, dst, progress=bar)
    finally:
        bar.finish()
    return 0
