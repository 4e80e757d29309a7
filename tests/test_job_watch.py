"""Watching job events (docs/jobs.md, "Watching job events"; docs/security.md): an
admin's ``grid.jobs.watch(all=True)`` sees every principal's job events from the admins'
feed ``<root>/events/jobs``; a client subscribing to that feed gets nothing from either
broker (their ACLs both come from broker.acl); an owner's own watch still gets its own.
``xcloud jobs --watch --all`` prints the same live, one line each, until Ctrl-C.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from broker.bus import Incoming
from client.api import Grid
from client.job_watch import JobWatch
from client.reservation import Refused
from schemas.job_messages import TERMINAL_JOB_STATES, JobEvent
from tests.fixtures.grid import ADMIN, GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import start_jobs_coordinator
from tests.test_jobs_e2e import agent, alice

BOB = "bob"


def _until_ended(watch: JobWatch, job: str, timeout: float = 60) -> list[JobEvent]:
    """The events ``watch`` yields up to ``job``'s terminal one (all jobs' events)."""
    seen: list[JobEvent] = []

    def terminal() -> bool:
        event = watch.get(timeout=0.5)
        if event is not None:
            seen.append(event)
        return any(e.job == job and e.state in TERMINAL_JOB_STATES for e in seen)

    wait_for(terminal, timeout=timeout, message=f"the terminal event of {job}")
    return seen


def test_admin_sees_every_job_a_client_sees_only_its_own(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=2)
    owner = alice(grid)
    admin = grid.client(ADMIN, "admin")
    bob: Grid = grid.client(BOB, "client")
    bob.jobs.poll_s = 0.5
    # A client asking the broker for the admins' feed directly (not through the client
    # API, which refuses first): the broker's ACL must give it nothing.
    spied: list[str] = []
    lock = threading.Lock()

    def spy(incoming: Incoming) -> None:
        with lock:
            spied.append(incoming.topic)

    for flt in (grid.topics.admin_job_events, f"{grid.root}/events/#", f"{grid.root}/+/jobs"):
        bob.bus.subscribe(flt, spy)
    with admin.jobs.watch(all=True) as everyone, owner.jobs.watch() as own:
        job = owner.submit("echo hi").job
        assert owner.jobs.wait([job], timeout=60)[0].state == "completed"
        admin_saw = _until_ended(everyone, job)
        own_saw = _until_ended(own, job)
        # Bob's own job: its events reach bob's inbox after alice's reached the feed, so
        # had the broker let bob's feed subscriptions through, alice's would be in by now.
        mine = bob.submit("true")
        assert mine.result(timeout=60).state == "completed"
        bob_saw = _until_ended(everyone, mine.job)  # the admin sees bob's job too
    assert [e.state for e in admin_saw if e.job == job][-1] == "completed"
    assert [e.state for e in own_saw if e.job == job][-1] == "completed"
    assert {e.job for e in own_saw} == {job}  # the owner's watch: its own jobs only
    assert any(e.job == mine.job and e.state == "completed" for e in bob_saw)
    with lock:
        assert spied == [], spied
    # A client asking for everyone's events through the API gets a clear refusal.
    with pytest.raises(Refused, match="only admins can watch every job"):
        bob.jobs.watch(all=True)


@pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)
def test_cli_jobs_watch_all_until_ctrl_c(grid: GridHarness, tmp_path: Path) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=2)
    owner = alice(grid)
    token = grid.token(ADMIN, "admin")
    env = grid.subprocess_env(XCLOUD_HOME=str(tmp_path / "home"), XCLOUD_BUS_PRINCIPAL=ADMIN,
                              XCLOUD_BUS_TOKEN=token, XCLOUD_BUS_URL=grid.url,
                              XCLOUD_BUS_ROOT=grid.root)
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "jobs", "--watch", "--all"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None
    assert stderr is not None
    try:
        assert "watching every job's events" in stderr.readline()
        job = owner.submit("echo watched").job
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")),
                                  daemon=True)
        reader.start()
        wait_for(lambda: any(job in line and "completed" in line for line in lines),
                 timeout=60, message="the watch line of the completed job")
        assert all(line.split()[1].startswith("j-") for line in lines)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
        reader.join(10)
        assert "Traceback" not in stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
