"""The shell's batch-job verbs beyond submit/jobs/wait/results/cancel (tests/test_jobs_e2e.py
``test_shell_verbs`` has those): ``job show ID``, ``logs ID [-f]`` (Ctrl-C stops following
and the shell goes on), ``hold ID... [--reason R]``, ``release ID...``, their one-line
errors, ``help`` and completion. Lines are fed to a real ``Shell`` with ``run_line``, as
the interactive prompt does, against a real coordinator and worker; the shell is the
same on either broker: these run on Mosquitto.
"""

from __future__ import annotations

import io
import os
import signal
import threading

import pytest

from client.console import Console
from client.jobs_cli import job_detail
from client.shell import _completer, run_line
from client.shell_commands import Shell
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import start_jobs_coordinator
from tests.test_jobs_e2e import agent, alice

pytestmark = pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)


def _shell(grid: GridHarness) -> tuple[Shell, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Shell(alice(grid), Console(out, err, False)), out, err


def _submitted(shell: Shell, line: str) -> str:
    assert run_line(shell, line)
    return shell.job_ids[-1]


def test_job_show_and_logs_of_an_ended_job(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=2)
    shell, out, err = _shell(grid)
    job = _submitted(shell, "submit -- echo to-out; echo to-err >&2")
    assert run_line(shell, f"wait {job}")
    assert f"{job}  completed  exit 0" in out.getvalue()
    before = len(out.getvalue())
    assert run_line(shell, f"job show {job}")
    shown = out.getvalue()[before:]
    assert shown == job_detail(shell.grid.jobs.show(job)) + "\n"  # the CLI's rendering
    assert "ATTEMPT" in shown
    assert "success" in shown
    before_out, before_err = len(out.getvalue()), len(err.getvalue())
    assert run_line(shell, f"logs {job}")
    assert out.getvalue()[before_out:] == "to-out\n"
    assert err.getvalue()[before_err:] == "to-err\n"
    # -f on an ended job prints what it kept, then how it ended
    assert run_line(shell, f"logs {job} -f")
    assert out.getvalue().endswith(f"to-out\n[job {job} completed, exit 0]\n")
    assert "Traceback" not in err.getvalue()


def test_logs_follow_live_and_ctrl_c_returns_to_the_prompt(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=2)
    shell, out, err = _shell(grid)
    short = _submitted(shell, "submit -- for i in 1 2 3; do echo line$i; sleep 0.3; done")
    assert run_line(shell, f"logs {short} -f")
    assert "line1\nline2\nline3\n" in out.getvalue()
    assert f"[job {short} completed, exit 0]" in out.getvalue()

    long = _submitted(shell, "submit -- echo tick; sleep 120")
    interrupted = threading.Event()

    def ctrl_c_once_ticking() -> None:
        """Ctrl-C as the terminal sends it, once the live output shows."""
        wait_for(lambda: "tick\n" in out.getvalue(), timeout=60, message="live output")
        interrupted.set()
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=ctrl_c_once_ticking, daemon=True)
    presser.start()
    assert run_line(shell, f"logs {long} -f")  # the shell goes on
    presser.join(10)
    assert interrupted.is_set()
    assert f"[stopped following job {long}; it goes on]" in out.getvalue()
    assert shell.grid.jobs.show(long).job["state"] == "running"  # the job goes on too
    assert run_line(shell, f"cancel {long}")
    wait_for(lambda: shell.grid.jobs.show(long).job["state"] == "cancelled", timeout=30,
             message="cancelled after following")
    assert "interrupted" not in err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_hold_release_errors_help_and_completion(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)  # no worker: the jobs stay queued
    shell, out, err = _shell(grid)
    one = _submitted(shell, "submit -- echo one")
    two = _submitted(shell, "submit -- echo two")
    store = shell.grid.jobs
    assert run_line(shell, f'hold {one} {two} --reason "disk full"')
    assert "hold: 2 job(s)" in out.getvalue()
    held = store.show(one).job
    assert held["state"] == "held"
    assert "disk full" in str(held.get("hold_reason"))
    assert store.show(two).job["state"] == "held"
    assert run_line(shell, f"release {one} {two}")
    assert "release: 2 job(s)" in out.getvalue()
    assert [store.show(j).job["state"] for j in (one, two)] == ["queued", "queued"]
    # jobs --watch: events live, one line each, until Ctrl-C; the shell goes on
    def hold_then_ctrl_c() -> None:
        wait_for(lambda: "watching your jobs' events" in out.getvalue(), timeout=30,
                 message="the watch to start")
        store.hold([one])
        wait_for(lambda: any(one in line and "held" in line
                             for line in out.getvalue().splitlines()), timeout=30,
                 message="the held event")
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=hold_then_ctrl_c, daemon=True)
    presser.start()
    assert run_line(shell, "jobs --watch")
    presser.join(10)
    assert "[stopped watching]" in out.getvalue()
    assert run_line(shell, f"release {one}")
    # Errors: one line each; the shell goes on.
    for line, words in (("hold", "usage: hold ID... [--reason R]"),
                        (f"hold {one} --reason", "--reason needs a value"),
                        (f"hold {one} --frob", "unknown option '--frob'"),
                        ("hold not/an/id", "not a job id: 'not/an/id'"),
                        ("job", "usage: job show ID"),
                        ("jobs --watch --frob", "usage: jobs --watch [--all]"),
                        ("jobs --watch --all", "only admins can watch every job"),
                        (f"job frob {one}", "usage: job show ID"),
                        (f"logs {one}", f"job {one} is queued: its output is there once"),
                        ("logs j-0000000000000000", "j-0000000000000000"),
                        ("job show j-0000000000000000", "j-0000000000000000"),
                        ("release", "no worker reserved")):
        err_before = len(err.getvalue())
        assert run_line(shell, line), line
        said = err.getvalue()[err_before:]
        assert words in said, (line, said)
        assert said.count("\n") == 1, (line, said)
    assert "Traceback" not in err.getvalue()
    assert "internal error" not in err.getvalue()
    assert [store.show(j).job["state"] for j in (one, two)] == ["queued", "queued"]
    # help lists the verbs; completion knows them and the jobs submitted here
    out_before = len(out.getvalue())
    assert run_line(shell, "help")
    listed = out.getvalue()[out_before:]
    for usage in ("job show ID", "hold ID...", "release [ID...]", "logs ID [-f]"):
        assert usage in listed, usage
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    completer = _completer(shell)

    def complete(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), CompleteEvent())]

    assert "hold" in complete("ho")
    assert complete("job ") == ["show"]
    assert complete("job show ")[:2] == [two, one]
    assert one in complete("release ")
    assert two in complete("logs ")
    assert "--reason" in complete(f"hold {one} ")


def test_submit_after_waits_for_its_parent(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=2)
    shell, out, err = _shell(grid)
    gate = grid.tmp_path / "parent-gate"
    parent = _submitted(shell, f"submit -- while [ ! -e {gate} ]; do sleep 0.05; done")
    child = _submitted(shell, f"submit --after {parent} --after-policy cancel -- echo child")
    # the child waits (queued, never assigned) while its parent runs
    wait_for(lambda: shell.grid.jobs.show(parent).job["state"] == "running", 20,
             message="the parent running")
    shown = shell.grid.jobs.show(child)
    assert shown.job["state"] == "queued"
    assert not shown.attempts
    gate.touch()
    assert run_line(shell, f"wait {child}")
    assert f"{child}  completed  exit 0" in out.getvalue()
    assert run_line(shell, "submit --after-policy sometimes -- true") is True
    assert "invalid choice" in err.getvalue()
    assert "Traceback" not in err.getvalue()
