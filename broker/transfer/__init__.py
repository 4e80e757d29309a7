"""File transfers over MQTT: one engine for client ↔ coordinator, worker ↔ coordinator
and client ↔ reserved worker (docs/transfer.md is the protocol).

Control messages (``xfer.init/state/ack/status/fin/abort/fetch``) are ordinary JSON wire
messages through the inboxes; segments are raw bytes on ``{dest}/xfer/{sender}/{tid}/
{offset}/{crc32}``. ``TransferEndpoint`` runs both ends on a ``Bus``; the owner plugs in
where bytes go and who may send them (``Sink``) and what a download may read
(``Source``).
"""

from broker.transfer.endpoint import TransferEndpoint, TransferResult
from broker.transfer.errors import (
    REFUSED_FOR_GOOD,
    TransferAborted,
    TransferError,
    TransferRefused,
    TransferStalled,
)
from broker.transfer.ranges import ByteRanges
from broker.transfer.sender import Outgoing, Peer, file_sha256
from broker.transfer.settings import TransferSettings
from broker.transfer.state import JsonStateStore, TransferPhase, TransferRecord
from broker.transfer.storage import (
    Admission,
    FileDownloadSink,
    Offer,
    Sink,
    Source,
    SourceFile,
)

__all__ = [
    "REFUSED_FOR_GOOD",
    "Admission",
    "ByteRanges",
    "FileDownloadSink",
    "JsonStateStore",
    "Offer",
    "Outgoing",
    "Peer",
    "Sink",
    "Source",
    "SourceFile",
    "TransferAborted",
    "TransferEndpoint",
    "TransferError",
    "TransferPhase",
    "TransferRecord",
    "TransferRefused",
    "TransferResult",
    "TransferSettings",
    "TransferStalled",
    "file_sha256",
]
