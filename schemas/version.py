"""xcloud's version, in one place: setup.py reads it from here, and every component
reports it (``pong.version``, ``coord.status.version``, ``worker.caps.agent_version``,
``xcloud --version``)."""

__version__ = "0.3.0"
