"""The worker state machine: the states a worker can be in and the transitions allowed.

Kept as an explicit table so the documentation (docs/state-machines.md), the tests and the
code all read the same thing.
"""

from __future__ import annotations

from enum import StrEnum

from coordinator.errors import InvalidTransition


class WorkerState(StrEnum):
    """Where a worker stands, as the coordinator sees it."""

    ONLINE = "online"  # connected, accepting work
    DRAINING = "draining"  # connected, finishing its work, accepting none
    LOST = "lost"  # silent past its heartbeat deadline, or disconnected uncleanly
    OFFLINE = "offline"  # shut down cleanly

    @property
    def is_live(self) -> bool:
        """True when the worker is expected to heartbeat (liveness timers apply)."""
        return self in LIVE_STATES


LIVE_STATES: frozenset[WorkerState] = frozenset({WorkerState.ONLINE, WorkerState.DRAINING})

TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.ONLINE: frozenset({WorkerState.DRAINING, WorkerState.LOST, WorkerState.OFFLINE}),
    WorkerState.DRAINING: frozenset({WorkerState.ONLINE, WorkerState.LOST, WorkerState.OFFLINE}),
    WorkerState.LOST: frozenset({WorkerState.ONLINE, WorkerState.DRAINING, WorkerState.OFFLINE}),
    # An offline worker said goodbye: it cannot be "lost" (no heartbeat is expected).
    WorkerState.OFFLINE: frozenset({WorkerState.ONLINE, WorkerState.DRAINING}),
}


def is_allowed(old: WorkerState, new: WorkerState) -> bool:
    """True if ``old -> new`` is a transition (or the same state, which is a no-op)."""
    return old == new or new in TRANSITIONS[old]


def check_transition(wid: str, old: WorkerState, new: WorkerState) -> None:
    """Raise ``InvalidTransition`` unless ``old -> new`` is allowed; same state is a no-op."""
    if not is_allowed(old, new):
        raise InvalidTransition(wid, old, new)
