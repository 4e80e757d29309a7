"""The worker state machine: the states a worker can be in and the transitions allowed.

Kept as an explicit table (``coordinator.transitions``) so the documentation
(docs/state-machines.md), the tests and the code all read the same thing.
"""

from __future__ import annotations

from enum import StrEnum

from coordinator.transitions import StateMachine


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

MACHINE: StateMachine[WorkerState] = StateMachine("worker", {
    WorkerState.ONLINE: {WorkerState.DRAINING, WorkerState.LOST, WorkerState.OFFLINE},
    WorkerState.DRAINING: {WorkerState.ONLINE, WorkerState.LOST, WorkerState.OFFLINE},
    WorkerState.LOST: {WorkerState.ONLINE, WorkerState.DRAINING, WorkerState.OFFLINE},
    # An offline worker said goodbye: it cannot be "lost" (no heartbeat is expected).
    WorkerState.OFFLINE: {WorkerState.ONLINE, WorkerState.DRAINING},
})
TRANSITIONS = MACHINE.transitions


def is_allowed(old: WorkerState, new: WorkerState) -> bool:
    """True if ``old -> new`` is a transition (or the same state, which is a no-op)."""
    return MACHINE.allows(old, new)


def check_transition(wid: str, old: WorkerState, new: WorkerState) -> bool:
    """True for a real move, False for a no-op; ``InvalidTransition`` when forbidden."""
    return MACHINE.check(wid, old, new)
