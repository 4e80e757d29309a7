"""Tuning of the transfer engine, with the defaults docs/transfer.md explains."""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB
MIN_SEGMENT = 4 * KIB  # schemas/json/xfer.init.json segment_size bounds
MAX_SEGMENT = 2 * MIB
TOPIC_ALLOWANCE = 1024  # room left in bus.max_payload beside a segment (topic, header)


@dataclass(frozen=True)
class TransferSettings:
    """One endpoint's transfer limits and timings.

    Sending: ``segment_size`` bytes per segment, at most ``window`` segments sent and
    not yet acknowledged. Receiving: an acknowledgement (after fdatasync) every
    ``ack_every`` segments, or ``ack_delay_s`` after the last unacknowledged one.
    A sender that hears nothing for ``resend_after_s`` asks the receiver what it holds
    and resends the rest; after ``stall_timeout_s`` without any progress it gives up
    (the transfer stays resumable).
    """

    segment_size: int = 256 * KIB
    # 32 in flight, an ack per 8 (2 MiB durable at a time): on a 2-core machine 16/4
    # left the pipeline waiting on acknowledgements, ~150 against ~190 MB/s (docs).
    window: int = 32
    ack_every: int = 8
    ack_delay_s: float = 0.05
    resend_after_s: float = 2.0
    stall_timeout_s: float = 60.0
    request_timeout_s: float = 10.0
    max_wire_ranges: int = 256  # ranges in one have list (schema bound)
    max_gaps: int = 256  # separate ranges a receiver keeps per transfer
    max_active_per_peer: int = 8  # incoming transfers one principal may have open
    # Incoming transfers in all. With every sender's window queued at a slow receiver,
    # its memory is bounded by max_active x window x segment_size (512 MiB by default).
    max_active: int = 64
    max_streams_per_peer: int = 4  # downloads one principal may have streaming from us
    max_streams: int = 16
    keep_done_s: float = 3600.0  # a finished transfer still answers fin/init this long
    max_done: int = 4096
    idle_expiry_s: float = 7 * 86400.0  # an incoming transfer untouched this long is dropped
    max_size: int = 1 << 40  # largest file accepted (storage may say less)
    fsync: bool = True  # fdatasync before acknowledging (off only for benchmarks of the wire)

    def __post_init__(self) -> None:
        if not MIN_SEGMENT <= self.segment_size <= MAX_SEGMENT:
            raise ValueError(f"segment_size must be {MIN_SEGMENT}..{MAX_SEGMENT} bytes")
        if self.window < 1 or self.ack_every < 1:
            raise ValueError("window and ack_every must be at least 1")
        if not 1 <= self.max_wire_ranges <= 256:
            raise ValueError("max_wire_ranges must be 1..256 (the schema's bound)")
        if self.max_gaps < self.window + 1:
            raise ValueError("max_gaps must exceed the window")
        for name in ("ack_delay_s", "resend_after_s", "stall_timeout_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    def fits(self, segment_size: int, max_payload: int) -> bool:
        """True when segments of ``segment_size`` are within bounds and the bus's limit."""
        return (MIN_SEGMENT <= segment_size <= MAX_SEGMENT
                and segment_size + TOPIC_ALLOWANCE <= max_payload)
