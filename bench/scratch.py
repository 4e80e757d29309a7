"""What one run writes and names, so that runs never meet: a scratch directory that is
removed afterwards, a topic root of its own, and files of random bytes (sizes in MB =
10^6 bytes).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

MB = 1_000_000


@contextlib.contextmanager
def scratch_dir(prefix: str = "xcloud-bench-") -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def unique_root(prefix: str = "bench") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_file(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        left = size
        while left:
            piece = min(left, 4 << 20)
            fh.write(os.urandom(piece))
            left -= piece
    return path
