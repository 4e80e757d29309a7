"""`xcloud admin` against a real grid (`xcloud up`): requests over the bus as the admin
principal `xcloud up` configured, and what a revoke or a rotation does to a principal
that is connected at that moment (its session is cut at once: the coordinator's
``broker.recheck`` to the embedded broker).
"""

from __future__ import annotations

import pytest

from client.api import Grid
from client.errors import ClientError
from tests.fixtures.e2e import E2EGrid
from tests.fixtures.services import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("action", ["revoke", "rotate"])
def test_revoke_or_rotate_cuts_a_live_session(process_grid: E2EGrid, action: str) -> None:
    grid = process_grid
    principal, token = grid.add_principal(f"victim-{action}")
    listed = grid.cli("admin", "principal", "list", check=True)
    assert principal in listed.stdout
    assert token not in listed.stdout
    client = Grid.connect(grid.config(principal, token))
    try:
        assert client.ping().principal == principal
        done = grid.cli("admin", "principal", action, principal, check=True)
        if action == "rotate":
            new_token = done.stdout.strip().splitlines()[-1]
            assert new_token != token
            with Grid.connect(grid.config(principal, new_token)) as fresh:
                assert fresh.ping().principal == principal
        wait_for(lambda: not client.connected, 10,
                 message=f"{principal} still connected after `xcloud admin principal "
                 f"{action}`")
        with pytest.raises(ClientError, match="refused"):
            Grid.connect(grid.config(principal, token)).close()
    finally:
        client.close()
