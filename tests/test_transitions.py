"""The one state-machine helper every coordinator machine uses (coordinator.transitions)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import pytest

from coordinator.errors import CoordinatorError, InvalidTransition
from coordinator.reservation_state import MACHINE as RESERVATIONS
from coordinator.transitions import StateMachine
from coordinator.worker_state import MACHINE as WORKERS


class Light(StrEnum):
    RED = "red"
    GREEN = "green"
    OFF = "off"


LIGHTS = StateMachine("light", {
    Light.RED: {Light.GREEN, Light.OFF},
    Light.GREEN: {Light.RED, Light.OFF},
    Light.OFF: set(),
})


def test_a_move_in_the_table_is_real() -> None:
    assert LIGHTS.check("l1", Light.RED, Light.GREEN) is True
    assert LIGHTS.allows(Light.RED, Light.GREEN)


def test_staying_is_a_no_op_for_every_machine() -> None:
    """The one self-transition rule: allowed, changes nothing, never a source of itself."""
    machines: tuple[StateMachine[Any], ...] = (LIGHTS, WORKERS, RESERVATIONS)
    for machine in machines:
        for state in machine.transitions:
            assert machine.allows(state, state)
            assert machine.check("k", state, state) is False
            assert state not in machine.sources_of(state)


def test_a_forbidden_move_raises_with_its_names() -> None:
    with pytest.raises(InvalidTransition) as info:
        LIGHTS.check("l1", Light.OFF, Light.RED)
    err = info.value
    assert isinstance(err, CoordinatorError)
    assert (err.machine, err.key, err.old, err.new) == ("light", "l1", "off", "red")
    assert "off -> red" in str(err)
    assert err.code == "conflict"


def test_sources_and_terminal_states() -> None:
    assert LIGHTS.sources_of(Light.OFF) == {Light.RED, Light.GREEN}
    assert LIGHTS.terminal == {Light.OFF}
    assert (Light.RED, Light.GREEN) in LIGHTS.edges
    assert len(LIGHTS.edges) == 4


def test_a_table_must_be_complete_and_free_of_self_loops() -> None:
    with pytest.raises(ValueError, match="without a row"):
        StateMachine("bad", {Light.RED: {Light.GREEN}})
    with pytest.raises(ValueError, match="not a transition"):
        StateMachine("bad", {Light.RED: {Light.RED}})
