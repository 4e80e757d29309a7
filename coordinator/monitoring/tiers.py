"""Resolutions and retentions of the stored time series, and which one serves a range.

Heartbeat samples are kept raw for ``raw_retention_s``; each tier then keeps buckets of
``res`` seconds for ``retention_s``. Tiers are listed finest first and each resolution is
a multiple of the previous one, so a tier is rolled up from the one below it. The number
of rows a worker can ever have is ``raw_retention / heartbeat + sum(retention / res)``,
whatever the grid's age: that is the bound the roll-up's retention enforces.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.errors import CoordinatorError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SPAN = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
GRID_RES = 10  # the grid-wide series' own raw resolution (one snapshot per pass)
MAX_POINTS = 1500  # a chart never needs more points than this
MAX_TIERS = 6


class MonitoringConfigError(CoordinatorError):
    """A ``[monitoring]`` setting that cannot work (bad tier list, ...)."""

    code = "invalid"


@dataclass(frozen=True, slots=True)
class Tier:
    """Buckets of ``res`` seconds kept for ``retention_s`` seconds."""

    res: int
    retention_s: int

    @property
    def name(self) -> str:
        return f"{format_span(self.res)}:{format_span(self.retention_s)}"


def parse_span(text: str) -> int:
    """``"15m"`` -> 900; plain numbers are seconds."""
    match = _SPAN.match(str(text))
    if not match:
        raise MonitoringConfigError(f"bad duration {text!r}: use e.g. 10s, 5m, 2h, 30d")
    return int(match.group(1)) * UNITS[match.group(2) or "s"]


def format_span(seconds: int) -> str:
    for unit in ("d", "h", "m"):
        size = UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_tiers(specs: Sequence[str]) -> list[Tier]:
    """``["1m:1d", "15m:8d"]`` checked: finest first, each a multiple of the previous."""
    if not specs:
        raise MonitoringConfigError("[monitoring] tiers must name at least one tier")
    if len(specs) > MAX_TIERS:
        raise MonitoringConfigError(f"[monitoring] tiers: at most {MAX_TIERS} tiers")
    tiers: list[Tier] = []
    for spec in specs:
        res_text, sep, keep_text = str(spec).partition(":")
        if not sep:
            raise MonitoringConfigError(
                f"[monitoring] tier {spec!r}: write RESOLUTION:RETENTION, e.g. 1m:1d")
        tier = Tier(parse_span(res_text), parse_span(keep_text))
        if tier.res < GRID_RES or tier.res % GRID_RES:
            raise MonitoringConfigError(
                f"[monitoring] tier {spec!r}: the resolution must be a multiple of {GRID_RES}s")
        if tier.retention_s < tier.res:
            raise MonitoringConfigError(
                f"[monitoring] tier {spec!r}: keep at least one bucket")
        if tiers and (tier.res <= tiers[-1].res or tier.res % tiers[-1].res):
            raise MonitoringConfigError(
                f"[monitoring] tier {spec!r}: each resolution must be a larger multiple of "
                f"the previous one ({format_span(tiers[-1].res)})")
        tiers.append(tier)
    return tiers


def pick_resolution(range_s: float, raw_retention_s: float, tiers: Sequence[Tier],
                    max_points: int = MAX_POINTS) -> int:
    """The resolution that draws ``range_s`` (0 = raw samples): the finest one that still
    holds the whole range and gives at most ``max_points`` points; else the coarsest."""
    if range_s <= raw_retention_s and range_s <= max_points * 5:
        return 0
    for tier in tiers:
        if tier.retention_s >= range_s and range_s / tier.res <= max_points:
            return tier.res
    return tiers[-1].res


def rows_per_worker(raw_retention_s: float, heartbeat_s: float, tiers: Sequence[Tier]) -> int:
    """The most rows one worker can hold across the raw table and every tier."""
    raw = int(raw_retention_s / max(heartbeat_s, 0.001)) + 1
    return raw + sum(tier.retention_s // tier.res + 1 for tier in tiers)
