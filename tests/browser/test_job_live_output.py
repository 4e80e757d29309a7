"""A running job's live output on its dashboard page (coordinator/http/job_output.py), in
headless Chromium against a real grid (a worker process, a coordinator serving the page).

Liveness is proven with a gate: the job prints a line and waits for a file the test
creates only after the page showed that line, so it can only have come while the job ran.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.bus import RemoteError
from schemas.job_messages import JobFollow
from tests.browser.support import Http, bearer, dashboard_grid, dashboard_url
from tests.browser.test_browser import browser, visible  # noqa: F401 (the fixture)
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import wait_for

WORKER = "lw1"


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GridHarness]:
    with dashboard_grid(tmp_path_factory.mktemp("live-output-grid")) as harness:
        harness.add_principals(("carol", "client"), ("dave", "client"), ("erin", "admin"))
        harness.start_worker(WORKER, 0.5, in_subprocess=True, display_name=WORKER)
        yield harness


def page_text(page: Any, element: str) -> str:
    text: str = page.execute_script(
        "return document.getElementById(arguments[0]).textContent", element)
    return text


def running_job(grid: GridHarness, name: str, command: str) -> str:
    """carol's job ``name`` running ``command``, once it runs; its id."""
    from tests.job_actors import JobClient

    carol = JobClient(grid, "carol")
    try:
        (jid,) = carol.submit({"command": command, "name": name})
    finally:
        carol.bus.stop()
    wait_for(lambda: (job := grid.store.get_job(jid)) is not None
             and job.state.value == "running", 30, message="the job running")
    return jid


def test_a_running_jobs_output_shows_live_then_its_final_state(
        grid: GridHarness, browser: Any, tmp_path: Path) -> None:  # noqa: F811

    gate = tmp_path / "gate"
    base = dashboard_url(grid)
    browser.get(base + "/")
    wait_for(lambda: visible(browser, "#login-form"), 10, message="the login form")
    # The job's owner, a plain client, watches it (an admin could too).
    for field, value in (("login-principal", "carol"),
                         ("login-token", grid.token("carol", "client"))):
        box = browser.find_element("id", field)
        box.clear()
        box.send_keys(value)
    browser.find_element("css selector", "#login-form button").click()
    wait_for(lambda: "carol" in page_text(browser, "who") or page_text(browser, "login-error"),
             10, message="logged in")
    assert not page_text(browser, "login-error")

    jid = running_job(grid, "live-page", (
        "echo first-line '<script>window.__pwned=1</script><b>bold</b>'; echo err-line >&2; "
        f"n=0; while [ ! -e {gate} ]; do sleep 0.1; n=$((n+1)); "
        "[ $n -gt 600 ] && exit 3; done; echo second-line"))
    browser.get(base + f"/#/job/{jid}")
    wait_for(lambda: "first-line" in page_text(browser, "job-live-stdout"), 20,
             message="the first line, live")
    assert not gate.exists()
    assert grid.store.get_job(jid).state.value == "running"  # type: ignore[union-attr]
    assert "second-line" not in page_text(browser, "job-live-stdout")
    wait_for(lambda: "err-line" in page_text(browser, "job-live-stderr"), 10,
             message="stderr, live")
    # Job output is text, never markup: the tags show as they are and nothing ran.
    assert "<script>window.__pwned=1</script><b>bold</b>" in page_text(
        browser, "job-live-stdout")
    assert browser.execute_script(
        "return document.querySelectorAll('#job-live-stdout *').length") == 0
    assert browser.execute_script("return window.__pwned === undefined") is True

    # Nobody else streams it: another client gets 404 like the job itself; an admin may.
    dave = Http(base)
    assert dave.get("/api/jobs", **bearer("dave", grid.token("dave", "client"))).status == 200
    reply = dave.get(f"/api/jobs/{jid}/output", **bearer("dave", grid.token("dave", "client")))
    assert reply.status == 404, reply
    # The worker refuses job.follow from a principal that is neither owner nor coordinator.
    job = grid.store.get_job(jid)
    assert job is not None
    assert job.current_attempt is not None
    for principal, role in (("dave", "client"), ("erin", "admin")):
        other = grid.client(principal, role)
        with pytest.raises(RemoteError) as refused:
            other.bus.request(other.topics.worker_inbox(WORKER),
                              JobFollow(attempt=job.current_attempt, follow=f"x-{principal}"))
        assert refused.value.code == "forbidden"

    gate.touch()
    wait_for(lambda: "second-line" in page_text(browser, "job-live-stdout"), 20,
             message="the second line after the gate")
    wait_for(lambda: browser.execute_script(
        "return document.getElementById('job-live').dataset.ended") == "1", 20,
        message="the end of the live output")
    assert "success" in page_text(browser, "job-live-state")
    wait_for(lambda: page_text(browser, "job-state") == "completed", 30,
             message="the final state on the page")
    wait_for(lambda: "second-line" in page_text(browser, "job-stdout"), 20,
             message="the stored result on the page")
    coordinator = grid.coordinator
    assert coordinator is not None
    assert coordinator.dashboard is not None
    relay = coordinator.dashboard.job_output
    assert relay is not None
    wait_for(lambda: not relay.relays, 10, message="the relay stopped")


def test_a_lost_worker_ends_the_live_output_with_a_clear_line(
        grid: GridHarness, browser: Any) -> None:  # noqa: F811
    """Runs after the test above (same page session); kills the grid's only worker."""

    base = dashboard_url(grid)
    jid = running_job(grid, "live-victim", (
        "echo before-the-loss; n=0; while [ $n -lt 200 ]; do sleep 0.1; n=$((n+1)); done"))
    browser.get(base + f"/#/job/{jid}")
    wait_for(lambda: "before-the-loss" in page_text(browser, "job-live-stdout"), 20,
             message="the first line, live")
    victim = next(w for w in grid.workers if w.wid == WORKER)
    victim.signal(signal.SIGKILL)
    wait_for(lambda: browser.execute_script(
        "return document.getElementById('job-live').dataset.ended") == "1", 30,
        message="the live output ended")
    assert f"worker {WORKER} is lost" in page_text(browser, "job-live-state")
    assert "before-the-loss" in page_text(browser, "job-live-stdout")
