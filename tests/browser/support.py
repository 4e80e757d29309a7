"""Helpers for the dashboard tests: a grid whose coordinator serves the dashboard, and a
small HTTP client (urllib, with cookies) that sees status codes and headers as they are.

``dashboard_grid`` builds on the grid harness (tests/fixtures/grid.py) but starts the
coordinator itself, since the harness only passes ``[coordinator]`` settings: the
dashboard listens on a free port of 127.0.0.1 and live updates tick quickly.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.fixtures.grid import COORDINATOR, GridHarness

if TYPE_CHECKING:
    from coordinator.service import Coordinator

LIVE_TICK_S = 0.3


@contextmanager
def dashboard_grid(tmp_path: Path, **monitoring: Any) -> Iterator[GridHarness]:
    """A grid (embedded broker, SQLite) whose coordinator serves the dashboard."""
    from coordinator.service import Coordinator

    harness = GridHarness(tmp_path, "amqtt", "sqlite", f"sqlite:///{tmp_path / 'grid.db'}")
    try:
        config = harness.config_for(COORDINATOR, "coordinator")
        config.monitoring.http = True
        config.monitoring.http_port = 0
        config.monitoring.live_tick_s = LIVE_TICK_S
        for key, value in monitoring.items():
            setattr(config.monitoring, key, value)
        watcher = harness.watcher
        coordinator = Coordinator(config, harness.store)
        harness.coordinator = coordinator
        coordinator.start()
        watcher.wait_coordinator_up(coordinator.started_at)
        yield harness
    finally:
        harness.close()


def dashboard_url(harness: GridHarness) -> str:
    coordinator: Coordinator | None = harness.coordinator
    assert coordinator is not None
    assert coordinator.dashboard is not None
    return coordinator.dashboard.url.rstrip("/")


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Http:
    """One browser-like client: keeps its cookies, sends what it is told to."""

    base: str
    jar: CookieJar = field(default_factory=CookieJar)
    csrf: str | None = None

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None, timeout: float = 10.0) -> Reply:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        try:
            with opener.open(request, timeout=timeout) as response:
                return Reply(response.status, response.headers, response.read())
        except urllib.error.HTTPError as err:
            return Reply(err.code, err.headers, err.read())

    def get(self, path: str, **headers: str) -> Reply:
        return self.request("GET", path, headers=headers)

    def login(self, principal: str, token: str) -> Reply:
        reply = self.request("POST", "/api/login", {"principal": principal, "token": token})
        if reply.status == 200:
            self.csrf = reply.json()["csrf"]
        return reply

    def post(self, path: str, body: Any, *, csrf: bool = True, **headers: str) -> Reply:
        if csrf and self.csrf:
            headers["X-XCloud-CSRF"] = self.csrf
        return self.request("POST", path, body, headers)


def bearer(principal: str, token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {principal}:{token}"}


def basic(principal: str, token: str) -> dict[str, str]:
    pair = base64.b64encode(f"{principal}:{token}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}
