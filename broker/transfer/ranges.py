"""Sets of byte ranges: what a receiver holds, what a sender still has to send.

Half-open ``[start, end)`` ranges kept sorted, disjoint and non-adjacent (touching
ranges merge), in two parallel lists searched with ``bisect``: adding a segment, asking
whether one is held and finding the contiguous prefix are O(log n) plus a list splice.
The number of ranges is what memory grows with, never the file size: receivers cap it
(``TransferSettings.max_gaps``) and the wire carries at most ``max_wire_ranges``.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence


class ByteRanges:
    """A set of byte offsets stored as sorted, merged ``[start, end)`` ranges."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[Sequence[int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    @classmethod
    def whole(cls, size: int) -> ByteRanges:
        return cls([(0, size)] if size > 0 else [])

    @classmethod
    def from_wire(cls, pairs: Iterable[Sequence[int]], size: int) -> ByteRanges:
        """Ranges from an untrusted peer: each ``0 <= start < end <= size`` or ValueError."""
        out = cls()
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"a range is a [start, end) pair, not {pair!r}")
            start, end = int(pair[0]), int(pair[1])
            if not 0 <= start < end <= size:
                raise ValueError(f"range [{start}, {end}) is outside [0, {size})")
            out.add(start, end)
        return out

    def copy(self) -> ByteRanges:
        out = ByteRanges()
        out._starts = list(self._starts)
        out._ends = list(self._ends)
        return out

    # -- changing -----------------------------------------------------------------

    def add(self, start: int, end: int) -> int:
        """Add ``[start, end)``; return how many bytes were not in the set before."""
        if end <= start:
            return 0
        i = bisect_left(self._ends, start)  # first range ending at or after start
        j = bisect_right(self._starts, end)  # first range starting after end
        if i == j:
            self._starts.insert(i, start)
            self._ends.insert(i, end)
            return end - start
        new_start = min(start, self._starts[i])
        new_end = max(end, self._ends[j - 1])
        before = sum(self._ends[k] - self._starts[k] for k in range(i, j))
        self._starts[i:j] = [new_start]
        self._ends[i:j] = [new_end]
        return (new_end - new_start) - before

    def update(self, other: ByteRanges) -> int:
        return sum(self.add(s, e) for s, e in other)

    # -- asking ---------------------------------------------------------------------

    def covers(self, start: int, end: int) -> bool:
        """True when every byte of ``[start, end)`` is in the set (an empty range is)."""
        if end <= start:
            return True
        i = bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def would_split(self, start: int, end: int) -> bool:
        """True when adding ``[start, end)`` would make a new range (touches none)."""
        i = bisect_left(self._ends, start)
        j = bisect_right(self._starts, end)
        return i == j

    def prefix_end(self) -> int:
        """End of the contiguous run starting at offset 0 (0 when offset 0 is missing)."""
        return self._ends[0] if self._starts and self._starts[0] == 0 else 0

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends))

    def first_start(self) -> int | None:
        return self._starts[0] if self._starts else None

    def last_end(self) -> int:
        return self._ends[-1] if self._ends else 0

    def missing(self, size: int) -> ByteRanges:
        """The complement within ``[0, size)``."""
        out = ByteRanges()
        pos = 0
        for s, e in zip(self._starts, self._ends):
            if s >= size:
                break
            if s > pos:
                out._starts.append(pos)
                out._ends.append(s)
            pos = max(pos, e)
        if pos < size:
            out._starts.append(pos)
            out._ends.append(size)
        return out

    def intersection(self, other: ByteRanges) -> ByteRanges:
        out = ByteRanges()
        a, b = list(self), list(other)
        i = j = 0
        while i < len(a) and j < len(b):
            s = max(a[i][0], b[j][0])
            e = min(a[i][1], b[j][1])
            if s < e:
                out.add(s, e)
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return out

    def to_wire(self, limit: int) -> tuple[list[list[int]], bool]:
        """At most ``limit`` pairs for a message; True when the list was cut short."""
        pairs = [[s, e] for s, e in zip(self._starts[:limit], self._ends[:limit])]
        return pairs, len(self._starts) > limit

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(zip(self._starts, self._ends)))

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ByteRanges):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    def __repr__(self) -> str:
        inner = ", ".join(f"[{s}, {e})" for s, e in self)
        return f"ByteRanges({inner})"
