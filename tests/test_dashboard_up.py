"""`xcloud up` serves the dashboard: it prints the URL beside the broker's, and the admin
token it wrote into config.toml logs in there (the newcomer's path, end to end)."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.browser.support import Http, bearer
from tests.fixtures.e2e import E2EGrid
from tests.fixtures.services import wait_for


def test_xcloud_up_prints_the_dashboard_and_its_token_logs_in(tmp_path: Path) -> None:
    grid = E2EGrid(tmp_path / "home", workers=1).start()
    try:
        def printed() -> str | None:
            found = re.search(r"^  dashboard\s+(http://127\.0\.0\.1:\d+)/",
                              grid.log_path.read_text(errors="replace"), re.M)
            return found.group(1) if found else None

        base = wait_for(printed, 10, message="the dashboard URL in the summary")
        assert base is not None
        assert re.search(r"^  broker\s+mqtt://", grid.log_path.read_text(), re.M)
        config = grid.config()
        http = Http(base)
        assert http.get("/api/workers").status == 401
        assert http.login(config.bus.principal, config.bus.token).status == 200
        (wid,) = grid.worker_ids()

        def row() -> dict[str, object] | None:
            rows = {w["id"]: w for w in http.get("/api/workers").json()["workers"]}
            found = rows.get(wid)
            return found if found and found["state"] == "online" and "cpu" in found else None

        assert wait_for(row, 20, message="the local worker with its CPU")

        def online() -> list[float]:
            scrape = http.get("/metrics", **bearer(config.bus.principal, config.bus.token))
            return [s.value for f in text_string_to_metric_families(scrape.body.decode())
                    for s in f.samples
                    if s.name == "xcloud_workers" and s.labels == {"state": "online"}]

        # Readers within SNAPSHOT_TTL_S (1 s) share one snapshot of the grid, which the
        # page's first calls may have taken before the worker came online.
        wait_for(lambda: online() == [1.0], 10, message="xcloud_workers{state=online} 1")
    finally:
        grid.stop()
