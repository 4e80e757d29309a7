"""The client: the `xcloud` CLI, the interactive shell and the Python API (``client.Grid``)."""

from client.api import Grid, WorkerInfo

__all__ = ["Grid", "WorkerInfo"]
