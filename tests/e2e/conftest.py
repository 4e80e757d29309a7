"""End-to-end tests run against a whole `xcloud up` grid (tests/fixtures/e2e.py).

Here ``grid`` is that grid (process or docker workers, see ``BOTH_EXECUTORS``), not the
in-process harness that tests/fixtures/grid.py provides to the other tests.
"""

from tests.fixtures.e2e import docker_grid, grid, process_grid

__all__ = ["docker_grid", "grid", "process_grid"]
