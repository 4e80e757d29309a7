"""Process-wide Prometheus instruments, cheap to import from hot code.

``instrumented`` wraps each coordinator request handler (``coordinator.handling.guarded``)
and observes its run time into ``REQUEST_SECONDS``, labelled by message type: a bounded
set, since the codec refuses unknown types before any handler runs. ``PROCESS`` counts
every coordinator in the process (one in production); each coordinator's ``/metrics``
re-exports it (``coordinator.monitoring.prometheus``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram

from broker.bus import Incoming

PROCESS = CollectorRegistry(auto_describe=True)
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
REQUEST_SECONDS = Histogram(
    "xcloud_request_duration_seconds",
    "Time the coordinator took to serve one request, by message type",
    ["type"], registry=PROCESS, buckets=REQUEST_BUCKETS)

RunFn = Callable[[Incoming], None]


def instrumented(run: RunFn) -> RunFn:
    """``run`` (a request handler of the bus) timed into ``REQUEST_SECONDS``."""

    def timed(incoming: Incoming) -> None:
        start = time.perf_counter()
        try:
            run(incoming)
        finally:
            REQUEST_SECONDS.labels(incoming.message.type).observe(time.perf_counter() - start)

    return timed
