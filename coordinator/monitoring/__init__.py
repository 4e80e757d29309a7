"""Monitoring: stored time series, grid-wide series and Prometheus metrics.

- ``tiers``: resolutions and retentions, and which one draws a time range;
- ``rollup``: heartbeat samples -> downsampled buckets -> coarser tiers, and retention;
- ``grid_series``: the grid-wide snapshot (workers by state, slots, reservations, ...);
- ``prometheus``: what ``/metrics`` exports (and the request-latency histogram);
- ``service``: ``MonitoringService``, the thread that runs a pass every ``rollup_s``.

The dashboard that shows all this is ``coordinator.http``; docs/monitoring.md.
"""
