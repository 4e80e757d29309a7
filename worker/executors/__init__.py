"""Executors: where commands actually run. One interface (``base.Executor``), one module
per driver: ``process`` (child process groups) and ``docker`` (containers)."""
