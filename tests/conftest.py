"""Top-level pytest configuration for xcloud's tests.

Fixtures live in modules under tests/fixtures/ and are loaded as plugins here, so
every test directory sees them. To add a fixture module, append its dotted name
to ``pytest_plugins`` below (pytest only honours ``pytest_plugins`` in this
top-level conftest).

- tests.fixtures.services: free ports, wait_for, MariaDB, Mosquitto, Docker, and
  the child-process leak guard.
- tests.fixtures.backends: ``broker_kind``, ``db_kind``, ``executor_kind`` (one test,
  collected once per real backend).
"""

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.backends",
    "tests.fixtures.grid",
    # Append further fixture modules here, e.g. "tests.fixtures.grid".
]
