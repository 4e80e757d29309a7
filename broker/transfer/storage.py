"""What the engine asks of its owner: where bytes go (``Sink``), what may be read
(``Source``).

The engine moves bytes; the coordinator, the worker and the client decide. A ``Sink``
is the receiving side's storage and authorization: it admits or refuses an offer (who
may send what, how big, quotas; or "I hold that already" for dedupe), says where the
partial file lives, persists the ``TransferRecord`` (a database row, a JSON file), and
takes the verified file at the end, atomically. A ``Source`` is the sending side of a
download: it resolves what an ``xfer.fetch`` names into a file the requester may read.

Refusals are ``TransferRefused(code, message)``: the code and message reach the peer
as the error reply. Every method runs on the bus's transfer lane, never on the MQTT
network thread, so a database call is fine; a slow one delays only transfers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from broker.transfer.errors import TransferRefused
from broker.transfer.state import JsonStateStore, TransferRecord, fsync_dir


@dataclass(frozen=True)
class Offer:
    """An incoming transfer as the sink judges it: ``peer`` is authenticated."""

    peer: str
    tid: str
    direction: str
    name: str
    size: int
    sha256: str
    segment_size: int
    purpose: dict[str, Any]


@dataclass(frozen=True)
class Admission:
    """A sink's yes: receive the file, or (``ref`` set) it is held already: done."""

    ref: dict[str, Any] | None = None


class Sink(Protocol):
    """Storage and authorization of a receiving side (see the module docstring)."""

    def admit(self, offer: Offer) -> Admission:
        """Accept (reserving quota), answer ``Admission(ref)`` for content already held,
        or raise ``TransferRefused``."""
        ...

    def partial_path(self, record: TransferRecord) -> Path:
        """Where the partial file of ``record`` lives (the engine creates and writes it)."""
        ...

    def save_state(self, record: TransferRecord) -> None:
        """Persist ``record`` (new, or its phase changed); durable on return."""
        ...

    def save_progress(self, record: TransferRecord) -> None:
        """Persist ``record.have``, which grew (nothing else changed since the last
        save); durable on return, because an acknowledgement follows at once. Called
        every few segments: make it cheap (an UPDATE of one column, a journal line)."""
        ...

    def load_states(self) -> Iterable[TransferRecord]:
        """Records saved earlier and not dropped (read once, when the endpoint starts)."""
        ...

    def drop_state(self, record: TransferRecord) -> None:
        """Forget ``record``: a finished one that aged out, or one aborted or failed
        (then release what ``admit`` reserved). The engine deletes the partial file."""
        ...

    def complete(self, record: TransferRecord, partial: Path) -> dict[str, Any]:
        """Take the verified file: move ``partial`` into place atomically, commit, and
        return the reference the sender gets (``sha256``, ``size``, and optionally
        ``name``, ``owner``, ``id``, ``path``: xfer.init.json#/definitions/data_ref).
        Raise ``TransferRefused`` (quota) to refuse; then nothing may be left visible."""
        ...


@dataclass(frozen=True)
class SourceFile:
    """A file a holder will stream: the bytes at ``path`` must hash to ``sha256``."""

    path: Path
    size: int
    sha256: str
    name: str


class Source(Protocol):
    """What an ``xfer.fetch`` may read, on the holder's side."""

    def open_fetch(self, requester: str, source: dict[str, Any]) -> SourceFile:
        """Resolve ``source`` (xfer.init.json#/definitions/purpose) for the authenticated
        ``requester``, or raise ``TransferRefused`` (``not_found``, ``forbidden``)."""
        ...


class FileDownloadSink:
    """The sink of one download into a local file ``dest``.

    The partial file and its JSON state live beside ``dest`` (so a re-run of the same
    download resumes), and the verified file replaces ``dest`` atomically. With
    ``expected_sha256`` (a content-addressed fetch) a holder offering other content is
    refused before a byte moves.
    """

    def __init__(self, dest: str | os.PathLike[str], *, expected_sha256: str | None = None,
                 max_size: int | None = None, durable: bool = True) -> None:
        self.dest = Path(dest)
        self.expected_sha256 = expected_sha256
        self.max_size = max_size
        self.states = JsonStateStore(self.dest.parent / f".{self.dest.name}.xfer",
                                     durable=durable)

    def admit(self, offer: Offer) -> Admission:
        if self.expected_sha256 and offer.sha256 != self.expected_sha256:
            raise TransferRefused("conflict", f"the holder offers {offer.sha256[:12]}…, "
                                  f"not the requested {self.expected_sha256[:12]}…")
        if self.max_size is not None and offer.size > self.max_size:
            raise TransferRefused("too_large", f"{offer.size} bytes is more than the "
                                  f"{self.max_size} allowed here")
        return Admission()

    def partial_path(self, record: TransferRecord) -> Path:
        return self.dest.parent / f".{self.dest.name}.{record.tid}.part"

    def save_state(self, record: TransferRecord) -> None:
        self.states.save(record)

    def save_progress(self, record: TransferRecord) -> None:
        self.states.save_have(record)

    def load_states(self) -> Iterable[TransferRecord]:
        return list(self.states)

    def drop_state(self, record: TransferRecord) -> None:
        self.states.delete(record)
        with contextlib.suppress(OSError):
            self.states.directory.rmdir()  # only once empty

    def complete(self, record: TransferRecord, partial: Path) -> dict[str, Any]:
        os.replace(partial, self.dest)
        fsync_dir(self.dest.parent)
        return {"sha256": record.sha256, "size": record.size, "name": record.name[:255],
                "path": str(self.dest)[:4096]}
