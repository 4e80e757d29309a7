"""One helper for every state machine of the coordinator (workers, reservations, and the
jobs and attempts to come).

Each machine is an enum plus an explicit table of allowed moves, so docs/state-machines.md,
the tests and the store all read the same thing. One rule for self-transitions holds for
every machine: **staying in the same state is not a transition** — ``check`` accepts it
as a no-op (returns False, nothing to write) and ``sources_of(target)`` never contains
``target`` itself. A store that moves rows ``WHERE state IN sources_of(target)`` therefore
lets exactly one of two racing movers win.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Generic, TypeVar

from coordinator.errors import InvalidTransition

S = TypeVar("S", bound=StrEnum)


class StateMachine(Generic[S]):
    """An explicit transition table over the states of one enum."""

    def __init__(self, name: str, table: Mapping[S, Iterable[S]]) -> None:
        self.name = name
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
            raise InvalidTransition(self.name, key, old.value, new.value)
        return True

    def sources_of(self, target: S) -> frozenset[S]:
        """The states from which ``target`` is reached (never ``target`` itself)."""
        return frozenset(old for old, ts in self.transitions.items() if target in ts)
