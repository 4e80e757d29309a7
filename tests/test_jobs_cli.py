"""The batch-job CLI end to end: ``xcloud submit``, ``jobs``, ``job show``, ``logs``,
``wait``, ``results``, ``cancel`` run as child processes against a real coordinator and
worker (tests/test_jobs_e2e.py has the rest). The CLI is the same on either broker: the
tests run on Mosquitto.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.grid import GridHarness
from tests.job_actors import start_jobs_coordinator
from tests.test_jobs_e2e import ALICE, agent, alice

ONE_BROKER = pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)


def _cli(grid: GridHarness, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    token = grid.token(ALICE, "client")
    env = grid.subprocess_env(XCLOUD_HOME=str(cwd / "home"), XCLOUD_BUS_PRINCIPAL=ALICE,
                              XCLOUD_BUS_TOKEN=token, XCLOUD_BUS_URL=grid.url,
                              XCLOUD_BUS_ROOT=grid.root)
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


@ONE_BROKER
def test_cli_submit_jobs_wait_results(grid: GridHarness, tmp_path: Path) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=2)
    (tmp_path / "in.txt").write_text("hello\n")
    sub = _cli(grid, "submit", "--count", "2", "--input", "in.txt", "--output", "*.res",
               "--json", "--", 'tr a-z A-Z < in.txt > up-$XCLOUD_JOB_INDEX.res; echo done',
               cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    ids: list[str] = json.loads(sub.stdout)
    assert len(ids) == 2
    waited = _cli(grid, "wait", *ids, "--timeout", "90", cwd=tmp_path)
    assert waited.returncode == 0, waited.stderr
    assert all(f"{j}  completed  exit 0" in waited.stdout for j in ids)
    table = _cli(grid, "jobs", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert all(j in table.stdout for j in ids)
    assert "2 completed" in table.stdout
    out = tmp_path / "res"
    got = _cli(grid, "results", ids[1], "-o", str(out), cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert (out / "stdout").read_text() == "done\n"
    assert (out / "outputs" / "up-1.res").read_text() == "HELLO\n"
    logs = _cli(grid, "logs", ids[0], cwd=tmp_path)
    assert logs.stdout == "done\n"
    show = _cli(grid, "job", "show", ids[0], cwd=tmp_path)
    assert "success" in show.stdout


@ONE_BROKER
def test_cli_sweep_and_cancel(grid: GridHarness, tmp_path: Path) -> None:
    start_jobs_coordinator(grid)
    client = alice(grid)  # no worker: the jobs stay queued
    (tmp_path / "sweep.txt").write_text("one\n\ntwo words\n")
    sub = _cli(grid, "submit", "--sweep", "sweep.txt", "--json", "--", "echo {}",
               cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    ids = json.loads(sub.stdout)
    specs = [client.jobs.show(j).job["spec"] for j in ids]
    assert [s["command"] for s in specs] == ["echo one", "echo 'two words'"]
    assert [s["env"]["XCLOUD_SWEEP"] for s in specs] == ["one", "two words"]
    held = _cli(grid, "hold", ids[0], cwd=tmp_path)
    assert held.returncode == 0, held.stderr
    assert client.jobs.show(ids[0]).job["state"] == "held"
    released = _cli(grid, "release", ids[0], cwd=tmp_path)
    assert released.returncode == 0, released.stderr
    assert client.jobs.show(ids[0]).job["state"] == "queued"
    cancelled = _cli(grid, "cancel", *ids, cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert all(client.jobs.show(j).job["state"] == "cancelled" for j in ids)
    bad = _cli(grid, "submit", "--", cwd=tmp_path)
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
