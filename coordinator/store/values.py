"""Checking and converting values at the store's boundary, shared by its concept modules.

Numbers from workers are untrusted: anything that is not a finite number of the column's
range becomes None rather than failing a batch; ids and names that do not fit their column
raise ``InvalidArgument`` before anything is written.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

from coordinator.errors import InvalidArgument

INT32 = 2**31 - 1
INT64 = 2**63 - 1
IN_CHUNK = 500  # ids per IN (...) list


def dumps(value: Any) -> str:
    """Compact, strict JSON: NaN/Infinity (which Python would emit) become null."""
    try:
        return json.dumps(value, separators=(",", ":"), default=str, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), separators=(",", ":"), default=str)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def loads(text: str | None, default: Any) -> Any:
    """A JSON column's value; ``default`` for an empty or broken one."""
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default


def as_float(value: Any) -> float | None:
    """A finite float, or None for anything else (bad input must not sink a batch)."""
    if type(value) is float or type(value) is int:
        return float(value) if math.isfinite(value) else None
    return None


def as_int(value: Any, limit: int = INT64) -> int | None:
    """An int within ``[-limit, limit]`` (column range), or None for anything else."""
    if type(value) is int:
        return value if -limit <= value <= limit else None
    if type(value) is float and math.isfinite(value):
        return int(value) if -limit <= value <= limit else None
    return None


def as_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def checked_text(value: Any, what: str, limit: int) -> str:
    """``value`` if it is a non-empty string that fits its column, else InvalidArgument."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string, got {value!r:.80}")
    if len(value) > limit:
        raise InvalidArgument(f"{what} is longer than {limit} characters: {value[:40]!r}...")
    return value


def dicts(query: Any) -> list[dict[str, Any]]:
    return list(query.dicts())


def tuples(query: Any) -> list[tuple[Any, ...]]:
    return list(query.tuples())


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def now_or(now: float | None) -> float:
    return time.time() if now is None else now
