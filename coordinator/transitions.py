"""The coordinator's state machines use the one helper (``schemas.transitions``) and
raise ``coordinator.errors.InvalidTransition`` (a ``CoordinatorError``, so request
handlers answer it with its ``code``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import TypeVar

from coordinator.errors import InvalidTransition
from schemas import transitions

S = TypeVar("S", bound=StrEnum)


class StateMachine(transitions.StateMachine[S]):
    """``schemas.transitions.StateMachine`` raising the coordinator's error."""

    def __init__(self, name: str, table: Mapping[S, Iterable[S]]) -> None:
        super().__init__(name, table, error=InvalidTransition)
