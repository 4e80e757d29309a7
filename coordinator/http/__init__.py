"""The coordinator's HTTP side: the monitoring dashboard, its JSON API, live updates
(server-sent events) and Prometheus ``/metrics`` (docs/monitoring.md).

- ``server``: ``DashboardServer``, aiohttp on its own loop and thread;
- ``auth``: logins, sessions, bearer tokens, CSRF;
- ``api`` and ``views``: the JSON API and what it returns;
- ``live``: the live-update feed;
- ``static/``: the page (no build step; uPlot vendored in ``static/vendor/``).
"""
