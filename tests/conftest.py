"""Top-level pytest configuration for xcloud's tests.

Fixtures live in modules under tests/fixtures/ and are loaded as plugins here, so
every test directory sees them. To add a fixture module, append its dotted name
to ``pytest_plugins`` below (pytest only honours ``pytest_plugins`` in this
top-level conftest). docs/DEVELOPING.md describes them.

- tests.fixtures.services: free ports, wait_for, require_service, MariaDB, Mosquitto,
  Docker.
- tests.fixtures.leaks: the thread guard (``no_leaked_threads``) and the child-process
  guard.
- tests.fixtures.backends: ``broker_kind``, ``db_kind``, ``executor_kind`` (one test,
  collected once per real backend) and the broker handles.
- tests.fixtures.grid: ``grid``, a whole grid per test on those backends (its
  hand-driven actors are in tests.fixtures.actors, not a plugin).

tests/fixtures/e2e.py (the `xcloud up` grid) is not a plugin: tests/e2e/conftest.py
imports its fixtures.
"""

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.leaks",
    "tests.fixtures.backends",
    "tests.fixtures.grid",
]
