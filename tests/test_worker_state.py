"""The worker state machine: the transition table, checked exhaustively, and its documentation."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from coordinator.errors import CoordinatorError, InvalidTransition
from coordinator.worker_state import (
    LIVE_STATES,
    TRANSITIONS,
    WorkerState,
    check_transition,
    is_allowed,
)

S = WorkerState
# The specification, written out independently of the code's table.
EXPECTED: set[tuple[WorkerState, WorkerState]] = {
    (S.ONLINE, S.DRAINING),
    (S.ONLINE, S.LOST),
    (S.ONLINE, S.OFFLINE),
    (S.DRAINING, S.ONLINE),
    (S.DRAINING, S.LOST),
    (S.DRAINING, S.OFFLINE),
    (S.LOST, S.ONLINE),
    (S.LOST, S.DRAINING),
    (S.LOST, S.OFFLINE),
    (S.OFFLINE, S.ONLINE),
    (S.OFFLINE, S.DRAINING),
}
DOC = Path(__file__).resolve().parent.parent / "docs" / "state-machines.md"


def test_values_are_lowercase_names() -> None:
    assert [s.value for s in WorkerState] == ["online", "draining", "lost", "offline"]
    assert WorkerState("lost") is WorkerState.LOST
    raw: str = "online"
    assert raw == WorkerState.ONLINE  # a str: JSON-able and comparable to raw values


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(WorkerState)


def test_table_matches_specification() -> None:
    table = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
    assert table == EXPECTED


@pytest.mark.parametrize(("old", "new"), list(itertools.product(WorkerState, repeat=2)))
def test_check_transition_every_pair(old: WorkerState, new: WorkerState) -> None:
    if old == new or (old, new) in EXPECTED:
        check_transition("w1", old, new)
        assert is_allowed(old, new)
        return
    assert not is_allowed(old, new)
    with pytest.raises(InvalidTransition) as info:
        check_transition("w1", old, new)
    err = info.value
    assert (err.key, err.old, err.new) == ("w1", old, new)
    assert isinstance(err, CoordinatorError)
    assert f"{old.value} -> {new.value}" in str(err)
    assert "w1" in str(err)


def test_offline_worker_cannot_be_lost() -> None:
    with pytest.raises(InvalidTransition):
        check_transition("w1", WorkerState.OFFLINE, WorkerState.LOST)


def test_live_states() -> None:
    assert frozenset({WorkerState.ONLINE, WorkerState.DRAINING}) == LIVE_STATES
    assert WorkerState.DRAINING.is_live
    assert not WorkerState.LOST.is_live


def test_documented_diagram_matches_table() -> None:
    """docs/state-machines.md draws exactly the table's edges, each with a cause."""
    text = DOC.read_text()
    section = text.split("## Worker", 1)[1].split("\n## ", 1)[0]
    edges = re.findall(r"^\s*(\w+)\s*-->\s*(\w+)\s*:\s*(\S.*)$", section, re.MULTILINE)
    drawn = {(WorkerState(a), WorkerState(b)) for a, b, _cause in edges if a != "[*]"}
    assert drawn == EXPECTED
