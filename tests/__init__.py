# Makes "tests" a regular package so that `tests.fixtures.*` (named in
# tests/conftest.py's pytest_plugins) imports from this repo, whatever else is on
# sys.path.
