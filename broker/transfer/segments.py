"""Segments: the raw-bytes messages that carry a file, and their topics.

A segment's payload is the bytes themselves (no envelope, no JSON, no base64: a 1 GiB
file through JSON+base64 would cost a third more bytes and most of a core's time). Its
metadata lives in the topic ``{xfer base}/{sender}/{tid}/{offset}/{crc32}``, where the
ACL vouches for ``sender`` as it does for an inbox's sender suffix. Everything here is
pure and cheap: the receiver runs it on every segment before touching its disk.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from broker.transfer.ranges import ByteRanges
from schemas.topics import valid_principal_id

TID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")  # envelope.json#/definitions/xfer_id
SHA256_RE = re.compile(r"[0-9a-f]{64}")  # envelope.json#/definitions/sha256
_MAX_OFFSET_DIGITS = 19  # 10**19 > any file size
_HEX = frozenset("0123456789abcdef")


def new_tid() -> str:
    return uuid.uuid4().hex


def valid_tid(tid: str) -> bool:
    return TID_RE.fullmatch(tid) is not None


def valid_sha256(digest: str) -> bool:
    return SHA256_RE.fullmatch(digest) is not None


def crc32(data: bytes) -> int:
    return zlib.crc32(data)


@dataclass(frozen=True, slots=True)
class SegmentAddress:
    """What a segment topic says: who sent it, for which transfer, where, which CRC."""

    sender: str
    tid: str
    offset: int
    crc32: int


def parse_segment_topic(xfer_base: str, topic: str) -> SegmentAddress | None:
    """The address of a segment topic under ``xfer_base``; None for anything malformed
    (wrong level count, bad sender or tid, an offset that is not plain decimal, a CRC
    that is not 8 lowercase hex digits)."""
    if not topic.startswith(xfer_base) or topic[len(xfer_base) : len(xfer_base) + 1] != "/":
        return None
    parts = topic[len(xfer_base) + 1 :].split("/")
    if len(parts) != 4:
        return None
    sender, tid, offset, crc = parts
    if not valid_principal_id(sender) or not valid_tid(tid):
        return None
    if (not offset or len(offset) > _MAX_OFFSET_DIGITS or not offset.isascii()
            or not offset.isdigit() or (offset[0] == "0" and len(offset) > 1)):
        return None
    if len(crc) != 8 or not _HEX.issuperset(crc):
        return None
    return SegmentAddress(sender, tid, int(offset), int(crc, 16))


def segment_length(offset: int, size: int, segment_size: int) -> int | None:
    """The length a segment at ``offset`` must have; None when no segment starts there."""
    if offset < 0 or offset >= size or offset % segment_size:
        return None
    return min(segment_size, size - offset)


def segment_count(size: int, segment_size: int) -> int:
    return -(-size // segment_size)


def segment_offsets(ranges: ByteRanges, size: int, segment_size: int) -> Iterator[int]:
    """Offsets of the segments that hold any byte of ``ranges``, ascending, each once."""
    next_offset = 0
    for start, end in ranges:
        end = min(end, size)
        if start >= end:
            continue
        first = max((start // segment_size) * segment_size, next_offset)
        yield from range(first, end, segment_size)
        next_offset = max(next_offset, -(-end // segment_size) * segment_size)


def segment_ranges(ranges: ByteRanges, size: int, segment_size: int) -> ByteRanges:
    """``ranges`` widened to whole segments (what a holder streams for them)."""
    out = ByteRanges()
    for start, end in ranges:
        end = min(end, size)
        if start >= end:
            continue
        first = (start // segment_size) * segment_size
        last = min(size, -(-end // segment_size) * segment_size)
        out.add(first, last)
    return out


def bitmap_to_ranges(bitmap: str, size: int, segment_size: int) -> ByteRanges:
    """The byte ranges a missing-blocks bitmap names (bit i, most significant bit first,
    set = block i missing). Raises ValueError for bad base64 or bits past the end."""
    try:
        bits = base64.b64decode(bitmap, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"bitmap is not base64: {err}") from None
    blocks = segment_count(size, segment_size)
    if len(bits) > -(-blocks // 8):
        raise ValueError(f"bitmap of {len(bits)} bytes is longer than {blocks} blocks")
    out = ByteRanges()
    for index, byte in enumerate(bits):
        if not byte:
            continue
        for bit in range(8):
            if byte & (0x80 >> bit):
                block = index * 8 + bit
                if block >= blocks:
                    raise ValueError(f"bitmap names block {block}; the file has {blocks}")
                start = block * segment_size
                out.add(start, min(size, start + segment_size))
    return out


def ranges_to_bitmap(ranges: ByteRanges, size: int, segment_size: int) -> str:
    """The missing-blocks bitmap of ``ranges`` (every block any byte of which is in it)."""
    bits = bytearray(-(-segment_count(size, segment_size) // 8))
    for offset in segment_offsets(ranges, size, segment_size):
        block = offset // segment_size
        bits[block // 8] |= 0x80 >> (block % 8)
    return base64.b64encode(bytes(bits)).decode()
