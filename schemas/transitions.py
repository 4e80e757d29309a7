"""One helper for every state machine in xcloud: workers, reservations, transfers, and
the jobs and attempts of the batch half.

Each machine is an enum plus an explicit table of allowed moves, so docs/state-machines.md,
the tests and the code all read the same thing. One rule for self-transitions holds for
every machine: **staying in the same state is not a transition** — ``check`` accepts it
as a no-op (returns False, nothing to write) and ``sources_of(target)`` never contains
``target`` itself. A store that moves rows ``WHERE state IN sources_of(target)`` therefore
lets exactly one of two racing movers win.

It lives in ``schemas`` (which imports nothing of ours) so that every package can use
it; a package passes its own error class (``coordinator.errors.InvalidTransition``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Generic, TypeVar

from schemas.errors import XcloudError

S = TypeVar("S", bound=StrEnum)


class InvalidTransition(XcloudError):
    """A state change that a machine's table does not allow."""

    code = "conflict"

    def __init__(self, machine: str, key: str, old: str, new: str) -> None:
        super().__init__(f"{machine} {key!r}: transition {old} -> {new} is not allowed")
        self.machine = machine
        self.key = key
        self.old = old
        self.new = new


class StateMachine(Generic[S]):
    """An explicit transition table over the states of one enum."""

    def __init__(self, name: str, table: Mapping[S, Iterable[S]], *,
                 error: type[InvalidTransition] = InvalidTransition) -> None:
        self.name = name
        self.error = error
        self.transitions: dict[S, frozenset[S]] = {s: frozenset(t) for s, t in table.items()}
        states = {s for s in self.transitions} | {t for ts in self.transitions.values()
                                                  for t in ts}
        missing = states - set(self.transitions)
        if missing:
            raise ValueError(f"{name}: states without a row: {sorted(missing)}")
        for state, targets in self.transitions.items():
            if state in targets:
                raise ValueError(f"{name}: {state} -> {state} is not a transition")

    @property
    def edges(self) -> frozenset[tuple[S, S]]:
        """Every ``(old, new)`` pair of the table (self-transitions excluded)."""
        return frozenset((old, new) for old, ts in self.transitions.items() for new in ts)

    @property
    def terminal(self) -> frozenset[S]:
        """States nothing leaves."""
        return frozenset(s for s, ts in self.transitions.items() if not ts)

    def allows(self, old: S, new: S) -> bool:
        """True when ``old -> new`` is in the table or is no move at all."""
        return old == new or new in self.transitions[old]

    def check(self, key: str, old: S, new: S) -> bool:
        """True for a real move, False for a no-op; ``InvalidTransition`` when forbidden."""
        if old == new:
            return False
        if new not in self.transitions[old]:
            raise self.error(self.name, key, old.value, new.value)
        return True

    def sources_of(self, target: S) -> frozenset[S]:
        """The states from which ``target`` is reached (never ``target`` itself)."""
        return frozenset(old for old, ts in self.transitions.items() if target in ts)
