"""Jobs that run registered applications (docs/jobs.md, "Applications as jobs").

Real coordinator (jobs scheduler), real in-process workers, the Python client and the
CLI: a binaries app (a shell script as this worker's platform's binary) runs with its
arguments; an app with no binary for the worker's platform is never assigned and ``why``
says so; a command app; refusals at submit (unknown, someone else's private app, an image
archive, command and app together); an image app goes to the docker executor.
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.transfer import file_sha256
from client.api import Grid
from client.console import Console
from client.errors import InvalidRequest
from client.jobs_cli import _app
from client.reservation import Refused
from client.shell import run_line
from client.shell_commands import Shell
from client.workflow import WorkflowError, load
from client.workflow_cli import cmd_workflow_run
from coordinator.store.apps import normalize_platform
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import BUSYBOX_IMAGE
from tests.fixtures.transfer import make_file
from tests.job_actors import start_jobs_coordinator
from tests.test_jobs_e2e import agent

ONE_BROKER = pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)
SCRIPT = '#!/bin/sh\necho "$# args:"; for a in "$@"; do echo "[$a]"; done\n'


def client_of(grid: GridHarness, name: str = "alice") -> Grid:
    client = grid.client(name, "client")
    client.jobs.poll_s = 0.5
    return client


def platform_of(grid: GridHarness, name: str) -> str:
    record = grid.store.get_worker(name)
    assert record is not None
    host = record.caps["host"]
    return normalize_platform(f"{host['os']}/{host['arch']}")


def other_platform(mine: str) -> str:
    return "linux/riscv64" if mine != "linux/riscv64" else "linux/s390x"


@ONE_BROKER
def test_a_binaries_app_runs_its_platforms_binary_with_the_arguments(
        grid: GridHarness, tmp_path: Path) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1")
    alice = client_of(grid)
    mine = platform_of(grid, "w1")
    prog = tmp_path / "prog.sh"
    prog.write_text(SCRIPT)
    bogus = make_file(tmp_path / "bogus", 3000, seed=7)  # not runnable here
    alice.apps.add("prog", binaries={mine: prog, other_platform(mine): bogus})
    alice.apps.add("prog", binaries={mine: bogus})  # version 2: the job pins version 1
    fut = alice.submit(app="prog", app_version="1", args=["a b", "$HOME", "c'd"], wall=60)
    result = fut.result(timeout=60)
    assert result.ok, result.stderr
    assert result.stdout == b"3 args:\n[a b]\n[$HOME]\n[c'd]\n"
    spec = alice.jobs.show(fut.job).job["spec"]
    assert (spec["app"]["version"], spec["app"]["owner"]) == ("1", "alice")
    assert spec["command"].startswith("./.xcloud-app/prog ")
    # The job keeps both binaries from garbage collection while it exists.
    refs = grid.store.data_refs(file_sha256(prog))
    assert ("job", fut.job, "alice") in refs
    assert ("job", fut.job, "alice") in grid.store.data_refs(file_sha256(bogus))
    # Latest when no version is given (version 2's binary is the bogus file: it fails).
    latest = alice.submit(app="prog", wall=60)
    assert alice.jobs.show(latest.job).job["spec"]["app"]["version"] == "2"
    assert not latest.result(timeout=60).ok


@ONE_BROKER
def test_an_app_without_a_binary_for_the_platform_is_never_assigned(
        grid: GridHarness, tmp_path: Path) -> None:
    start_jobs_coordinator(grid, unmatchable_hold_s=3600)
    agent(grid, "w1")
    alice = client_of(grid)
    mine = platform_of(grid, "w1")
    foreign = other_platform(mine)
    alice.apps.add("armonly", binaries={foreign: make_file(tmp_path / "x", 100, seed=8)})
    stuck = alice.submit(app="armonly", args=["x"])
    assert alice.jobs.last_warnings == [{
        "job": stuck.job, "message": f"matches no known worker: no worker can run app "
        f"armonly 1: it has binaries for {foreign} only"}]
    # A runnable job submitted after it runs: the scheduler passed it over.
    assert alice.submit("echo ok").result(timeout=60).ok
    shown = alice.jobs.show(stuck.job)
    assert (shown.job["state"], shown.attempts) == ("queued", [])
    why = alice.jobs.why(stuck.job)
    (row,) = [r for r in why["requirements"] if r["name"] == "app"]
    assert (row["wanted"], row["match"], row["reject"]) == ("armonly 1", 0, 1)
    assert f"has no binary for {mine} (it has {foreign})" in row["example"]
    assert why["verdict"] == (f"no online worker can run app armonly 1: it has binaries "
                              f"for {foreign} only")


@ONE_BROKER
def test_a_command_app_and_the_cli(grid: GridHarness, tmp_path: Path) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1")
    alice = client_of(grid)
    alice.apps.add("greet", command="printf '%s|' hello")
    result = alice.submit(app="greet", args=["wor ld", "*"]).result(timeout=60)
    assert result.ok, result.stderr
    assert result.stdout == b"hello|wor ld|*|"
    # The CLI: --app NAME[@VERSION] then the arguments (with or without --).
    env = grid.subprocess_env(
        XCLOUD_HOME=str(tmp_path / "home"), XCLOUD_BUS_PRINCIPAL="alice",
        XCLOUD_BUS_TOKEN=grid.token("alice", "client"), XCLOUD_BUS_URL=grid.url,
        XCLOUD_BUS_ROOT=grid.root)
    sub = subprocess.run([sys.executable, "-m", "client.cli", "submit", "--app", "greet@1",
                          "--wait", "--", "x y"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert sub.returncode == 0, sub.stderr
    jid = sub.stdout.strip()
    assert alice.jobs.show(jid).job["spec"]["args"] == ["x y"]
    assert alice.jobs.result(jid).stdout == b"hello|x y|"
    # The shell's submit: --app, then the arguments after --.
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(alice, Console(out, err, False))
    assert run_line(shell, "submit --app greet@1 -- 'a b' c")
    assert run_line(shell, f"wait {shell.job_ids[-1]}"), err.getvalue()
    assert alice.jobs.result(shell.job_ids[-1]).stdout == b"hello|a b|c|"
    # A workflow node: app = "NAME", args = [...].
    flow = tmp_path / "flow.toml"
    flow.write_text('[jobs.hi]\napp = "greet"\napp_version = "1"\nargs = ["wf"]\n')
    assert cmd_workflow_run(argparse.Namespace(file=str(flow), json=False, wait=True,
                                               check=False), grid.config_for("alice")) == 0
    (ran,) = [j for j in alice.jobs.ls() if j["name"] == "hi"]
    assert alice.jobs.result(ran["id"]).stdout == b"hello|wf|"
    flow.write_text('[jobs.hi]\napp = "greet"\ncommand = "true"\n')
    with pytest.raises(WorkflowError, match="a command or an app, not both"):
        load(flow)


def test_cli_app_argument_parsing() -> None:
    assert _app("sim", ["--", "a"]) == {"app": "sim", "app_version": None,
                                        "app_owner": None, "args": ["a"]}
    assert _app("bob/sim@1.2", ["a", "--x"]) == {"app": "sim", "app_version": "1.2",
                                                  "app_owner": "bob", "args": ["a", "--x"]}
    for bad in ("sim@", "bob/", "@1"):
        with pytest.raises(InvalidRequest):
            _app(bad, [])


@ONE_BROKER
def test_refused_at_submit(grid: GridHarness, tmp_path: Path) -> None:
    grid.add_principals(("alice", "client"), ("bob", "client"))
    start_jobs_coordinator(grid)
    alice, bob = client_of(grid, "alice"), client_of(grid, "bob")
    alice.apps.add("secret", command="true")
    alice.apps.add("team", command="true", share=["bob"])
    alice.apps.add("tool", image_archive=make_file(tmp_path / "t.tar", 500, seed=9))
    cases: list[tuple[Grid, dict[str, Any], str, str]] = [
        (bob, {"app": {"name": "nothing"}}, "not_found", "job 0: you have no app nothing"),
        (bob, {"app": {"name": "secret", "owner": "alice"}}, "not_found",
         "job 0: alice has no app secret shared with bob"),
        (alice, {"app": {"name": "secret", "version": "7"}}, "not_found",
         "job 0: you have no app secret version 7"),
        (alice, {"app": {"name": "tool"}}, "invalid", "jobs cannot run yet"),
        (alice, {"app": {"name": "secret"}, "command": "true"}, "invalid",
         "job 0: give a command or an app, not both"),
        (alice, {"command": "true", "args": ["x"]}, "invalid", "args go with an app"),
    ]
    for who, spec, code, text in cases:
        with pytest.raises(Refused) as info:
            who.jobs.submit_specs([spec])
        assert info.value.code == code, (spec, info.value)
        assert text in str(info.value), (spec, info.value)
    with pytest.raises(InvalidRequest):
        alice.jobs.spec("true", app="secret")
    # Shared with bob: his job is accepted and pinned to alice's app.
    fut = bob.submit(app="team", app_owner="alice")
    assert bob.jobs.show(fut.job).job["spec"]["app"]["owner"] == "alice"
    assert alice.jobs.ls() == []


@pytest.mark.parametrize("executor_kind", ["docker"], indirect=True)
@ONE_BROKER
def test_an_image_app_runs_with_the_docker_executor(grid: GridHarness,
                                                   executor_kind: str) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "d1", executor=executor_kind)
    alice = client_of(grid)
    alice.apps.add("bb", image=BUSYBOX_IMAGE)
    fut = alice.submit(app="bb", args=["sh", "-c", "echo in; test -f /.dockerenv && echo d"])
    result = fut.result(timeout=90)
    assert result.ok, result.stderr
    assert result.stdout == b"in\nd\n"
    spec = alice.jobs.show(fut.job).job["spec"]
    assert spec["requirements"] == {"executor": "docker", "image": BUSYBOX_IMAGE}


def test_place_marks_only_flagged_inputs_executable(tmp_path: Path) -> None:
    from worker.job_files import place

    source = tmp_path / "src"
    source.write_text(SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    plain = place(source, work, "data.sh")
    binary = place(source, work, ".xcloud-app/prog", executable=True)
    assert not os.stat(plain).st_mode & stat.S_IXUSR
    assert os.stat(binary).st_mode & 0o777 == 0o755
