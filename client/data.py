"""Data objects in Python: ``grid.data`` (docs/data.md).

    with Grid.connect() as grid:
        ref = grid.data.put("input.dat", name="run-42/input")   # -> DataRef
        for item in grid.data.ls():
            print(item.name, item.size, item.sha256[:12])
        grid.data.get(ref, "copy.dat")          # or a name, or a hash
        grid.data.share("run-42/input", ["bob"])
        grid.data.pin(ref); grid.data.rm("run-42/input")

The bytes move with the transfer engine (broker/transfer, docs/transfer.md) between
this session's endpoint (``grid.transfers``) and the coordinator; uploads are resumable
(running the same ``put`` again continues where it stopped: its transfer id derives from
the content and the name) and content the coordinator holds already is not sent again.
Every error is a ``ClientError``: a refusal (quota exceeded, not shared with you, ...)
is ``Refused`` with the coordinator's words and code.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.transfer import Peer, TransferError, TransferRefused, TransferStalled, file_sha256
from client.errors import ClientError, InvalidRequest, Unreachable
from client.reservation import Refused
from schemas.data_messages import (
    DataList,
    DataListReply,
    DataPin,
    DataRm,
    DataShare,
    DataShow,
    DataShowReply,
)

if TYPE_CHECKING:
    from client.api import Grid

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
ACCESS = ("private", "shared", "public")
PAGE = 500
HEX = frozenset("0123456789abcdef")


def is_sha256(text: str) -> bool:
    return len(text) == 64 and set(text) <= HEX


@dataclass(frozen=True)
class DataRef:
    """A data object as the coordinator holds it: content address, size, and this name
    of it (owner, name, rights)."""

    sha256: str
    size: int
    name: str = ""
    owner: str = ""
    id: str = ""
    access: str = "private"
    share: tuple[str, ...] = ()
    created_at: float | None = None
    last_used_at: float | None = None
    expires_at: float | None = None
    pinned: bool = False
    refs: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    @classmethod
    def from_wire(cls, item: dict[str, Any],
                  refs: Sequence[dict[str, Any]] = ()) -> DataRef:
        return cls(sha256=str(item["sha256"]), size=int(item["size"]),
                   name=str(item.get("name") or ""), owner=str(item.get("owner") or ""),
                   id=str(item.get("id") or ""), access=str(item.get("access") or "private"),
                   share=tuple(item.get("share") or ()), created_at=item.get("created_at"),
                   last_used_at=item.get("last_used_at"), expires_at=item.get("expires_at"),
                   pinned=bool(item.get("pinned")), refs=tuple(refs))

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "refs"}
        data["share"] = list(self.share)
        if self.refs:
            data["refs"] = list(self.refs)
        return data


@contextlib.contextmanager
def _translated(what: str, peer: str = "") -> Iterator[None]:
    """Transfer errors as client errors, in the coordinator's words (without the
    engine's "peer: " prefix: ``what`` says who was asked)."""
    try:
        yield
    except ClientError:
        raise
    except TransferRefused as err:
        text = str(err)
        if peer and text.startswith(f"{peer}: "):
            text = text[len(peer) + 2:]
        raise Refused(f"cannot {what}: {text}", err.code) from err
    except TransferStalled as err:
        raise Unreachable(f"cannot {what}: {err}") from err
    except TransferError as err:
        raise ClientError(f"cannot {what}: {err}") from err


class DataStore:
    """``grid.data``: the coordinator's data objects (see the module docstring)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    @property
    def peer(self) -> Peer:
        return Peer(self.grid.config.client.coordinator_principal,
                    self.grid.topics.coord_inbox)

    # -- bytes --------------------------------------------------------------------------------

    def put(self, path: str | os.PathLike[str], *, name: str | None = None,
            access: str | None = None, share: Sequence[str] | None = None,
            expires_s: float | None = None, owner: str | None = None,
            progress: Progress | None = None) -> DataRef:
        """Store the file at ``path`` (as ``name``, default its file name) and return
        its reference. ``access``: ``private`` (default), ``shared`` (with ``share``)
        or ``public``; ``expires_s``: the name may be collected after this long unless
        pinned; ``owner``: admins may store for someone else."""
        file = Path(path)
        if not file.is_file():
            raise InvalidRequest(f"{file} is not a file")
        shared = [s for s in share or () if s]
        access = access or ("shared" if shared else "private")
        if access not in ACCESS:
            raise InvalidRequest(f"access must be one of {', '.join(ACCESS)}, not {access!r}")
        if shared and access != "shared":
            raise InvalidRequest(f"access {access} takes no share list")
        if len(shared) > 64:
            raise InvalidRequest("share data with at most 64 principals")
        label = name or file.name
        if not label or len(label) > 255:
            raise InvalidRequest("a data name is 1-255 characters")
        if expires_s is not None and not 0 <= expires_s <= 315360000:
            raise InvalidRequest("expires_s must be 0 to 10 years in seconds")
        purpose: dict[str, Any] = {"kind": "data", "name": label, "access": access}
        if shared:
            purpose["share"] = shared
        if expires_s is not None:
            purpose["expires_s"] = expires_s
        if owner:
            purpose["owner"] = owner
        self.grid._check_coordinator()
        with _translated(f"read {file}"):
            try:
                digest = file_sha256(file)
            except OSError as err:
                raise InvalidRequest(f"cannot read {file}: {err.strerror or err}") from err
        # The same put, run again, resumes the same transfer.
        tid = hashlib.sha256(f"{self.grid.principal}\0{digest}\0{purpose}".encode()
                             ).hexdigest()[:32]
        with _translated(f"store {file} on the coordinator", self.peer.principal):
            result = self.grid.transfers.upload(self.peer, file, purpose=purpose, name=label,
                                                sha256=digest, tid=tid, progress=progress)
        ref = dict(result.ref)
        ref.setdefault("sha256", digest)
        ref.setdefault("size", result.size)
        ref.setdefault("access", access)
        if shared:
            ref.setdefault("share", shared)
        return DataRef.from_wire(ref)

    def get(self, key: DataRef | str, path: str | os.PathLike[str] | None = None, *,
            owner: str | None = None, progress: Progress | None = None) -> Path:
        """Fetch a data object (a ``DataRef``, a name, a hash or a unique hash prefix)
        into ``path`` (a file, or a directory to put it in under its name; default
        the current directory). The bytes are verified against the hash before they
        replace ``path``. Returns the path written."""
        if isinstance(key, DataRef):
            sha, label = key.sha256, key.name or key.sha256
        elif is_sha256(key) and owner is None:
            sha, label = key, key
        else:
            found = self.show(key, owner=owner)
            sha, label = found.sha256, found.name or found.sha256
        dest = Path(path) if path is not None else Path.cwd()
        if dest.is_dir():
            dest = dest / Path(label).name
        self.grid._check_coordinator()
        with _translated(f"fetch {label}", self.peer.principal):
            self.grid.transfers.download(self.peer, {"kind": "data", "sha256": sha}, dest,
                                         expected_sha256=sha, progress=progress)
        return dest

    # -- names ----------------------------------------------------------------------------------

    def ls(self, *, all: bool = False, limit: int | None = None) -> list[DataRef]:
        """Your data objects (admins: everyone's with ``all``), by owner and name."""
        out: list[DataRef] = []
        offset = 0
        while True:
            page = PAGE if limit is None else min(PAGE, limit - len(out))
            if page <= 0:
                break
            reply: DataListReply = self.grid.ask(
                DataList(all=all or None, limit=page, offset=offset or None),
                what="list data")
            out.extend(DataRef.from_wire(item) for item in reply.items)
            offset += len(reply.items)
            if not reply.more or not reply.items:
                break
        return out

    def show(self, key: DataRef | str, *, owner: str | None = None) -> DataRef:
        """One data object with what keeps it alive (``refs``)."""
        text, owner = self._key(key, owner)
        reply: DataShowReply = self.grid.ask(DataShow(key=text, owner=owner),
                                             what=f"show data {text}")
        return DataRef.from_wire(reply.item, reply.refs or ())

    def rm(self, key: DataRef | str, *, owner: str | None = None) -> int:
        """Remove your name(s) for an object; returns how many went. The bytes are
        collected once nothing names or references them."""
        text, owner = self._key(key, owner)
        reply = self.grid.ask(DataRm(key=text, owner=owner), what=f"remove data {text}")
        return int((reply.detail or {}).get("removed", 0))

    def pin(self, key: DataRef | str, *, owner: str | None = None) -> None:
        """Keep the object whatever its names' expiry says."""
        text, owner = self._key(key, owner)
        self.grid.ask(DataPin(key=text, owner=owner, pin=True), what=f"pin data {text}")

    def unpin(self, key: DataRef | str, *, owner: str | None = None) -> None:
        text, owner = self._key(key, owner)
        self.grid.ask(DataPin(key=text, owner=owner, pin=False), what=f"unpin data {text}")

    def share(self, key: DataRef | str, principals: Sequence[str] | None = None, *,
              public: bool = False, owner: str | None = None) -> None:
        """Share with ``principals``, make ``public``, or (neither) private again."""
        text, owner = self._key(key, owner)
        names = [p for p in principals or () if p]
        if public and names:
            raise InvalidRequest("public data is shared with everyone: give no principals")
        access = "public" if public else "shared" if names else "private"
        self.grid.ask(DataShare(key=text, owner=owner, access=access, share=names or None),
                      what=f"share data {text}")

    @staticmethod
    def _key(key: DataRef | str, owner: str | None) -> tuple[str, str | None]:
        if isinstance(key, DataRef):
            return key.sha256, owner or key.owner or None
        if not key or len(key) > 255:
            raise InvalidRequest("name a data object by its name or hash (1-255 characters)")
        return key, owner
