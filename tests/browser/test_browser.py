"""The dashboard in headless Chromium (Debian's chromium + chromium-driver, via Selenium)
against a real grid: real worker processes heartbeating, a coordinator serving the page.

One grid and one browser for the module. Screenshots of each step are saved under the
pytest temporary directory (the path is printed; ``-s`` shows it) as test artifacts.
In CI the browser must be there (scripts/test installs it): a missing one fails through
``require_service``.
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.support import dashboard_grid, dashboard_url
from tests.fixtures.grid import ADMIN, GridHarness
from tests.fixtures.services import find_executable, require_service, wait_for

CHROMIUM = ("chromium", "chromium-browser")
DRIVER = ("chromedriver", "chromium-driver")
WORKERS = ("bw1", "bw2")
VICTIM = "bw-victim"
HEARTBEAT_S = 0.5


def _find(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = find_executable(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GridHarness]:
    with dashboard_grid(tmp_path_factory.mktemp("browser-grid")) as harness:
        for wid in (*WORKERS, VICTIM):
            harness.start_worker(wid, HEARTBEAT_S, in_subprocess=True, display_name=wid)
        yield harness


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dashboard-screenshots")
    print(f"\ndashboard screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    chromium, driver_path = _find(CHROMIUM), _find(DRIVER)
    if chromium is None or driver_path is None:
        require_service("chromium", "headless Chromium and its driver are not installed "
                        "(apt-get install chromium chromium-driver; scripts/test does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    log = Path(tempfile.mkdtemp(prefix="chromedriver-")) / "chromedriver.log"
    driver = webdriver.Chrome(options=options,
                              service=Service(executable_path=driver_path, log_output=str(log)))
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


def shot(browser: Any, shots: Path, name: str) -> None:
    browser.save_screenshot(str(shots / f"{name}.png"))


def fetch_status(browser: Any, path: str) -> int:
    """What the page's own fetch() gets for ``path`` (same origin, its cookies)."""
    status: int = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {credentials: 'same-origin'}).then(r => done(r.status));", path)
    return status


def visible(browser: Any, css: str) -> bool:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return bool(browser.find_element("css selector", css).is_displayed())
    except (NoSuchElementException, StaleElementReferenceException):
        return False  # not there yet, or re-rendered between the find and the look


def row_state(browser: Any, wid: str) -> str | None:
    state: str | None = browser.execute_script(
        "const r = document.querySelector(`tr[data-worker=\"${arguments[0]}\"]`);"
        "return r ? r.dataset.state : null;", wid)
    return state


def test_the_page_refuses_access_without_a_token(grid: GridHarness, browser: Any,
                                                 shots: Path) -> None:
    base = dashboard_url(grid)
    browser.delete_all_cookies()
    browser.get(base + "/#/workers")
    wait_for(lambda: visible(browser, "#login-form"), 10, message="the login form")
    assert not visible(browser, "#view-workers")
    assert browser.find_elements("css selector", "tr[data-worker]") == []
    assert fetch_status(browser, "/api/workers") == 401
    browser.find_element("id", "login-token").send_keys("not-the-token")
    browser.find_element("css selector", "#login-form button").click()
    wait_for(lambda: browser.find_element("id", "login-error").text, 10,
             message="a login error")
    assert fetch_status(browser, "/api/workers") == 401
    shot(browser, shots, "01-refused")


def test_log_in_and_see_the_live_workers(grid: GridHarness, browser: Any,
                                         shots: Path) -> None:
    base = dashboard_url(grid)
    browser.get(base + "/")
    wait_for(lambda: visible(browser, "#login-form"), 10, message="the login form")
    principal = browser.find_element("id", "login-principal")
    principal.clear()
    principal.send_keys(ADMIN)
    token = browser.find_element("id", "login-token")
    token.clear()
    token.send_keys(grid.token(ADMIN, "admin"))
    browser.find_element("css selector", "#login-form button").click()
    wait_for(lambda: visible(browser, "#cards"), 10, message="the overview")
    wait_for(lambda: browser.execute_script(
        "return document.querySelector('[data-card=workers_online] .value').textContent")
        == str(len(WORKERS) + 1), 10, message="the online count on the overview")
    shot(browser, shots, "02-overview")
    browser.get(base + "/#/workers")
    for wid in (*WORKERS, VICTIM):
        wait_for(lambda w=wid: row_state(browser, w) == "online", 10,  # type: ignore[misc]
                 message=f"{wid} online in the table")
    # The table's numbers are the store's: CPU as the latest heartbeat said.
    cpu = browser.execute_script(
        "return document.querySelector('tr[data-worker=bw1] td[data-cpu]').dataset.cpu")
    assert cpu != ""
    shot(browser, shots, "03-workers")


def test_the_workers_table_sorts_and_filters(grid: GridHarness, browser: Any,
                                            shots: Path) -> None:
    browser.get(dashboard_url(grid) + "/#/workers")
    wait_for(lambda: row_state(browser, "bw2") == "online", 10, message="the table")

    def shown() -> list[str]:
        ids: list[str] = browser.execute_script(
            "return [...document.querySelectorAll('tr[data-worker]')]"
            ".map(r => r.dataset.worker)")
        return ids

    header = browser.find_element("css selector", "#workers-table th[data-sort=name]")
    wait_for(lambda: shown() == sorted(shown()) and len(shown()) == 3, 5, message="by name")
    header.click()  # the second click on the sorted column reverses it
    wait_for(lambda: shown() == sorted(shown(), reverse=True), 5, message="reversed")
    box = browser.find_element("id", "workers-filter")
    box.send_keys("victim")
    wait_for(lambda: shown() == [VICTIM], 5, message="filtered to the victim")
    box.clear()
    box.send_keys("zzz-nothing")
    wait_for(lambda: shown() == [], 5, message="filtered to nothing")
    shot(browser, shots, "03b-filtered")
    box.clear()
    browser.execute_script("arguments[0].dispatchEvent(new Event('input'))", box)


def test_a_worker_cpu_graph_has_points_from_its_heartbeats(grid: GridHarness, browser: Any,
                                                           shots: Path) -> None:
    base = dashboard_url(grid)
    browser.get(base + "/#/worker/bw1")
    browser.execute_script("window.__sameDocument = true")
    wait_for(lambda: browser.find_elements("css selector", "[data-chart=cpu] canvas"), 10,
             message="the CPU chart")

    def points() -> list[tuple[float, float]]:
        cols = browser.execute_script("return window.xcloud.chartData('cpu')") or [[], []]
        return [(t, v) for t, v in zip(cols[0], cols[1], strict=True) if v is not None]

    wait_for(lambda: len(points()) >= 3, 15, message="CPU points")
    first = points()
    stored = {round(float(row[2]), 6): row[3]
              for row in grid.store.raw_series("bw1", 0, 2e10, 100_000)}
    for t, value in first:
        assert stored.get(round(t, 6)) == value, (t, value)
    # New heartbeats arrive as points without a reload.
    newest = first[-1][0]
    wait_for(lambda: points()[-1][0] > newest, 10, message="a live CPU point")
    assert browser.execute_script("return window.__sameDocument") is True
    live_t, live_v = points()[-1]
    wait_for(lambda: round(live_t, 6) in {round(float(r[2]), 6) for r in
                                          grid.store.raw_series("bw1", 0, 2e10, 100_000)},
             5, message="the live point stored as a sample")
    row = [r for r in grid.store.raw_series("bw1", 0, 2e10, 100_000)
           if round(float(r[2]), 6) == round(live_t, 6)]
    assert row[0][3] == live_v
    shot(browser, shots, "04-worker-cpu")


def test_a_killed_worker_shows_as_lost_without_a_reload(grid: GridHarness, browser: Any,
                                                        shots: Path) -> None:
    base = dashboard_url(grid)
    browser.get(base + "/#/workers")
    wait_for(lambda: row_state(browser, VICTIM) == "online", 10, message="victim online")
    browser.execute_script("window.__sameDocument = true")
    victim = next(w for w in grid.workers if w.wid == VICTIM)
    victim.signal(signal.SIGKILL)
    wait_for(lambda: row_state(browser, VICTIM) == "lost", 5,
             message="the killed worker shown as lost")
    assert browser.execute_script("return window.__sameDocument") is True
    assert row_state(browser, "bw1") == "online"
    shot(browser, shots, "05-lost")


def test_a_submitted_job_appears_live_and_shows_its_output(grid: GridHarness, browser: Any,
                                                          shots: Path) -> None:
    from tests.job_actors import JobClient

    base = dashboard_url(grid)
    browser.get(base + "/#/jobs")
    wait_for(lambda: visible(browser, "#jobs-table"), 10, message="the Jobs view")
    browser.execute_script("window.__sameDocument = true")
    grid.add_principals(("carol", "client"))
    carol = JobClient(grid, "carol")
    try:
        (jid,) = carol.submit({"command": "echo dashboard-says-hello; echo oops >&2",
                               "name": "hello-page"})
    finally:
        carol.bus.stop()

    def job_state() -> str | None:
        state: str | None = browser.execute_script(
            "const r = document.querySelector(`tr[data-job=\"${arguments[0]}\"]`);"
            "return r ? r.dataset.state : null;", jid)
        return state

    wait_for(lambda: job_state() is not None, 10, message="the job listed without a reload")
    wait_for(lambda: job_state() == "completed", 30, message="the job completed on the page")
    assert browser.execute_script("return window.__sameDocument") is True
    assert grid.store.get_job(jid).state.value == "completed"  # type: ignore[union-attr]
    shot(browser, shots, "06-jobs")
    # Filtered like the workers table.
    box = browser.find_element("id", "jobs-filter")
    box.send_keys("hello-page")
    wait_for(lambda: browser.execute_script(
        "return [...document.querySelectorAll('tr[data-job]')].map(r => r.dataset.job)")
        == [jid], 5, message="filtered to the job")
    box.send_keys("-nothing")
    wait_for(lambda: browser.find_elements("css selector", "tr[data-job]") == [], 5,
             message="filtered to nothing")
    box.clear()
    browser.execute_script("arguments[0].dispatchEvent(new Event('input'))", box)
    browser.find_element("css selector", f"tr[data-job=\"{jid}\"] a").click()
    wait_for(lambda: browser.execute_script(
        "return document.getElementById('job-stdout').textContent") ==
        "dashboard-says-hello\n", 10, message="the stdout preview")
    assert browser.execute_script(
        "return document.getElementById('job-stderr').textContent") == "oops\n"
    kinds = browser.execute_script(
        "return [...document.querySelectorAll('#attempts-table tr[data-attempt]')]"
        ".map(r => r.dataset.kind)")
    assert kinds == ["success"]
    shot(browser, shots, "07-job")
    # The overview counts jobs and charts them.
    browser.get(base + "/#/")
    wait_for(lambda: visible(browser, "[data-card=jobs_running]"), 10, message="job cards")
    assert browser.execute_script(
        "return document.querySelector('[data-card=jobs_queued] .value').textContent") == "0"
    wait_for(lambda: browser.find_elements(
        "css selector", "[data-series=jobs_completed_per_min] canvas"), 10,
        message="the completed-per-minute sparkline")
    shot(browser, shots, "08-overview-jobs")
