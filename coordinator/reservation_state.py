"""The reservation state machine, and the errors the reservation rules raise.

Kept as an explicit table (``coordinator.transitions``, like ``worker_state.py``) so
docs/state-machines.md, the tests and the store's conditional updates all read the same
thing: the store moves a reservation only ``WHERE state IN sources_of(target)``, so two
racing enders (lease timer, worker lost, release) cannot both win.
"""

from __future__ import annotations

from enum import StrEnum

from coordinator.errors import AlreadyExists, CoordinatorError
from coordinator.transitions import StateMachine


class ReservationState(StrEnum):
    """Where a reservation stands."""

    OPENING = "opening"  # recorded; waiting for the worker to confirm reservation.open
    ACTIVE = "active"  # confirmed by the worker; the holder has a grant
    ENDED = "ended"  # over, with a reason; the worker was told to close it

    @property
    def is_live(self) -> bool:
        """True while the reservation holds its worker (not ended)."""
        return self is not ReservationState.ENDED


LIVE_STATES: frozenset[ReservationState] = frozenset(
    {ReservationState.OPENING, ReservationState.ACTIVE}
)

MACHINE: StateMachine[ReservationState] = StateMachine("reservation", {
    ReservationState.OPENING: {ReservationState.ACTIVE, ReservationState.ENDED},
    ReservationState.ACTIVE: {ReservationState.ENDED},
    ReservationState.ENDED: set(),  # final: a new reservation gets a new id
})
TRANSITIONS = MACHINE.transitions


def is_allowed(old: ReservationState, new: ReservationState) -> bool:
    """True if ``old -> new`` is a transition of the table (or no move at all)."""
    return MACHINE.allows(old, new)


def sources_of(target: ReservationState) -> frozenset[ReservationState]:
    """The states from which ``target`` may be reached."""
    return MACHINE.sources_of(target)


def check_transition(rid: str, old: ReservationState, new: ReservationState) -> bool:
    """True for a real move, False for a no-op; ``InvalidTransition`` when forbidden."""
    return MACHINE.check(rid, old, new)


class WorkerNotReservable(CoordinatorError):
    """The worker exists but is not in a state that takes reservations."""

    code = "conflict"

    def __init__(self, wid: str, state: str) -> None:
        if state in ("lost", "offline"):
            text = f"worker {wid} is {state}, not running"
        else:
            text = f"worker {wid} is {state}, not accepting reservations"
        super().__init__(text)
        self.wid = wid
        self.state = state


class WorkerAlreadyReserved(AlreadyExists):
    """Another live reservation holds the worker (the unique ``active_worker`` index)."""

    def __init__(self, wid: str) -> None:
        super().__init__(f"worker {wid} is already reserved")
        self.wid = wid


class ReservationLimitReached(CoordinatorError):
    """The principal already holds ``max_reservations_per_principal`` live reservations."""

    code = "conflict"

    def __init__(self, client: str, held: list[tuple[str, str]]) -> None:
        if len(held) == 1:
            rid, wid = held[0]
            text = f"you already hold reservation {rid} on worker {wid}; release it first"
        else:
            listed = ", ".join(f"{rid} on {wid}" for rid, wid in held)
            text = f"you already hold {len(held)} reservations ({listed}); release one first"
        super().__init__(text)
        self.client = client
        self.held = held
