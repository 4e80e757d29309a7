"""The ``process`` executor on its own: what only this driver does (containment by cgroup
and the reaper, limits, the host work dir, task records, markers). What every driver
does is in tests/executors/.

Containment is tested in each mode the machine gives (``mode``: cgroup v1, cgroup v2,
and ``off``, the fallback of process groups, sessions and markers); a mode the machine
lacks fails under XCLOUD_REQUIRE_SERVICES=1 (require_service).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from broker.config import WorkerConfig
from tests.executors.harness import marked_processes, run, start
from tests.fixtures.services import require_service, wait_for
from worker.executors.base import (
    DriverState,
    ExecutorContext,
    ExecutorError,
    Limits,
    SessionHandle,
    SessionSpec,
)
from worker.executors.cgroups import STATE_FILE, detect
from worker.executors.process import ProcessExecutor

REPO = Path(__file__).resolve().parents[1]
MODES = ["v1", "v2", "off"]
#: The coordinator's default liveness deadline (heartbeat 5 s x factor 2): commands of a
#: worker killed with -9 must be gone by the time it is declared lost.
HEARTBEAT_DEADLINE_S = 10.0
#: A command that leaves everything the markers and process groups can see: its own
#: session, no XCLOUD_* variables. Prints its pid.
ESCAPE = ("env -u XCLOUD_RESERVATION -u XCLOUD_EXEC_ID -u XCLOUD_WORKDIR "
          "setsid nohup sleep 600 >/dev/null 2>&1 & echo $!")


@pytest.fixture(autouse=True)
def no_leaks(tmp_path: Path) -> Iterator[None]:
    yield
    wait_for(lambda: not marked_processes(tmp_path), timeout=10,
             message="a test left processes running")


def _required(wanted: str) -> str:
    if wanted != "off":
        layout = detect(wanted)
        if layout.version != int(wanted[1]):
            require_service(f"cgroup {wanted}", layout.note)
    return wanted


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """A containment mode; one this machine cannot give is a missing service."""
    return _required(request.param)


@pytest.fixture(params=MODES[:2])
def cgroup_mode(request: pytest.FixtureRequest) -> str:
    """A containment mode with cgroups."""
    return _required(request.param)


@pytest.fixture
def made(tmp_path: Path) -> Iterator[Callable[..., ProcessExecutor]]:
    """Makes process executors on ``tmp_path/state``; closes them after the test."""
    executors: list[ProcessExecutor] = []

    def make(cgroups: str = "auto", **kwargs: object) -> ProcessExecutor:
        ex = ProcessExecutor(tmp_path / "state", kill_grace_s=1.0, cgroups=cgroups,
                             **kwargs)  # type: ignore[arg-type]
        executors.append(ex)
        return ex

    yield make
    for ex in executors:
        ex.close()


@pytest.fixture
def executor(made: Callable[..., ProcessExecutor]) -> ProcessExecutor:
    return made()


def open_session(ex: ProcessExecutor, tmp_path: Path, rid: str = "r1",
                 limits: Limits | None = None) -> SessionHandle:
    return ex.open_session(SessionSpec(rid, tmp_path / "sessions" / rid / "work", "alice",
                                       limits=limits or Limits()))


def cgroup_limits(ex: ProcessExecutor, rid: str = "r1") -> set[str]:
    """The limits the session's cgroup enforces (the others are rlimits)."""
    cgroup = ex.containment.existing(rid)
    return set(cgroup.limited) if cgroup is not None else set()


def gone(pid: int) -> bool:
    """Has process ``pid`` ended (a zombie has)?"""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_all(pids: list[int], root: Path | None = None) -> None:
    """Clean up after a test whose processes were not all killed: these pids, and the
    processes marked with a work dir under ``root``."""
    victims = [*pids, *(p.pid for p in marked_processes(root))] if root else pids
    for pid in victims:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def test_work_dir_is_private(executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    assert (Path(session.workdir).stat().st_mode & 0o777) == 0o700
    caps = executor.capabilities()
    assert caps.security_boundary is False
    assert caps.isolation == "none"
    assert caps.limits == {"memory_bytes", "pids"}


def test_shell_error_line_numbers_are_kept(executor: ProcessExecutor, tmp_path: Path) -> None:
    # The prelude is on the command's own line: a syntax error names line 1.
    session = open_session(executor, tmp_path)
    syntax = run(executor, session, "if then fi")
    assert syntax[0].exit_code == 2
    assert b"1:" in syntax[1].of("stderr")


def test_a_command_killing_itself_is_reported_as_a_signal(executor: ProcessExecutor,
                                                          tmp_path: Path) -> None:
    # The shell's own death by a signal is a signal here (docker reports 128+N as an
    # exit code unless the driver sent that signal).
    session = open_session(executor, tmp_path)
    result, _ = run(executor, session, "kill -TERM $$")
    assert (result.exit_code, result.signal) == (None, signal.SIGTERM)


def test_memory_limit(mode: str, tmp_path: Path, made: Callable[..., ProcessExecutor]
                      ) -> None:
    # With a cgroup the limit binds the session as a whole and the OOM killer takes the
    # hog (reported); without, RLIMIT_AS makes its allocation fail.
    ex = made(mode)
    session = open_session(ex, tmp_path, limits=Limits(memory_bytes=300 * 2**20))
    result, out = run(ex, session,
                      "python3 -c 'x = bytearray(600 * 2**20); x[::4096] = b\"1\" * "
                      "(len(x) // 4096)'; echo hog $?; "
                      "python3 -c 'x = bytearray(20 * 2**20); print(\"small ok\")'")
    text = out.text() + out.of("stderr").decode()
    assert "small ok" in text
    if "memory_bytes" not in cgroup_limits(ex):  # no cgroup, or v2 without the controller
        assert mode != "v1"
        assert "MemoryError" in text
        assert not result.oom_killed
    else:
        assert "hog 137" in text  # SIGKILL, from the OOM killer
        assert result.oom_killed
    result, _ = run(ex, session, "true")
    assert not result.oom_killed  # only a kill while the command ran counts


def test_pids_limit(mode: str, tmp_path: Path, made: Callable[..., ProcessExecutor]
                    ) -> None:
    ex = made(mode)
    probe = open_session(ex, tmp_path, "probe", limits=Limits(pids=4321))
    by_cgroup = "pids" in cgroup_limits(ex, "probe")
    ex.close_session(probe)
    if not by_cgroup:  # no cgroup, or v2 without the controller
        assert mode != "v1"
        if os.geteuid() != 0:
            mine = len([p for p in psutil.process_iter() if p.uids().real == os.getuid()])
            session = open_session(ex, tmp_path, limits=Limits(pids=mine + 5))
            result, out = run(ex, session,
                              "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 2 & done; wait")
            assert b"fork" in out.of("stderr").lower() or result.exit_code != 0
            return
        # RLIMIT_NPROC does not bind root (the kernel exempts CAP_SYS_RESOURCE), so as
        # root check that the limit is applied to the command, not that forks fail.
        session = open_session(ex, tmp_path, limits=Limits(pids=4321))
        result, out = run(ex, session, "grep 'Max processes' /proc/self/limits")
        assert result.exit_code == 0
        assert out.of("stdout").split()[2:4] == [b"4321"] * 2
        return
    # The session's cgroup binds everyone, root included: 8 processes in all. dash
    # gives up at the first fork that fails.
    session = open_session(ex, tmp_path, limits=Limits(pids=8))
    result, out = run(ex, session,
                      "for i in $(seq 1 20); do sleep 30 >/dev/null 2>&1 & done; echo all")
    assert result.exit_code == 2
    assert b"fork" in out.of("stderr").lower()
    assert out.text() == ""
    ex.close_session(session)  # and the sleeps that did start go with the session


def test_close_session_kills_escaped_processes_and_removes_the_dir(
        executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    handle, out = start(executor, session,
                        "setsid sleep 60 >/dev/null 2>&1 & echo ready; sleep 60")
    wait_for(lambda: out.of("stdout") == b"ready\n", message="command did not start")
    wait_for(lambda: len(marked_processes(tmp_path)) >= 3, message="processes not seen")
    executor.close_session(session)
    result = executor.wait(handle, 5)
    assert result is not None
    assert result.signal == signal.SIGTERM
    assert not Path(session.workdir).exists()
    wait_for(lambda: not marked_processes(tmp_path), message="escaped process survived")


def test_close_session_of_an_unreadable_handle_leaves_the_dir(executor: ProcessExecutor,
                                                              tmp_path: Path) -> None:
    # Its processes are found by their markers; its path is not trusted to delete.
    session = open_session(executor, tmp_path)
    handle, out = start(executor, session, "echo ready; sleep 60")
    wait_for(lambda: out.of("stdout") == b"ready\n", message="command did not start")
    stale = SessionHandle(session.session_id, "process", session.workdir)  # layout 0
    executor.close_session(stale)
    result = executor.wait(handle, 10)
    assert result is not None
    assert result.signal == signal.SIGTERM
    assert Path(session.workdir).is_dir()


def test_cleanup_orphans_of_a_previous_run(tmp_path: Path, mode: str,
                                           made: Callable[..., ProcessExecutor]) -> None:
    state = tmp_path / "state"
    first = made(cgroups=mode)
    session = open_session(first, tmp_path)
    handle, out = start(first, session, "echo ready; sleep 60")
    wait_for(lambda: out.of("stdout") == b"ready\n", message="command did not start")
    # without cgroups its record finds it; in one, the cgroup tree the state dir names
    assert bool(list((state / "process").glob("*.json"))) == (mode == "off")
    # A new executor on the same state dir (a restarted worker) finds and kills it.
    second = made(cgroups=mode)
    assert second.recover([session]) == [session]
    assert second.cleanup_orphans(keep={"r1"}) >= 1
    result = first.wait(handle, 5)
    assert result is not None
    assert result.signal == signal.SIGKILL
    assert not list((state / "process").glob("*.json"))
    assert Path(session.workdir).is_dir()  # the session itself survives
    gone = SessionHandle("r2", "process", str(tmp_path / "nowhere"),
                         driver_state=DriverState(ProcessExecutor.STATE_VERSION, {}))
    assert second.recover([gone]) == []


def test_missing_workdir(executor: ProcessExecutor, tmp_path: Path) -> None:
    ghost = SessionHandle("r9", "process", str(tmp_path / "missing"),
                          driver_state=DriverState(ProcessExecutor.STATE_VERSION, {}))
    with pytest.raises(ExecutorError):
        start(executor, ghost, "true")


# ------------------------------------------------------------------------ containment


def test_the_mode_is_detected_and_logged(mode: str, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.executors.process")
    config = WorkerConfig(process_cgroups=mode)
    ex = ProcessExecutor.create(ExecutorContext(config, tmp_path / "state", "w1"))
    try:
        expected = "none" if mode == "off" else f"cgroup {mode}"
        assert ex.containment.mode == expected
        line = next(r.getMessage() for r in caplog.records
                    if r.getMessage().startswith("process executor: "))
        assert (f"cgroup {mode} under" in line) if mode != "off" else ("no cgroups" in line)
    finally:
        ex.close()


def test_a_setsid_escapee_without_markers_dies_at_release(
        cgroup_mode: str, tmp_path: Path, made: Callable[..., ProcessExecutor]) -> None:
    # (Without cgroups this escape is the documented limit, docs/exec.md.)
    ex = made(cgroup_mode)
    session = open_session(ex, tmp_path)
    result, out = run(ex, session, ESCAPE)
    assert result.exit_code == 0
    pid = int(out.text())
    try:
        escapee = psutil.Process(pid)
        wait_for(lambda: escapee.name() == "sleep", message="the escapee did not exec")
        assert "XCLOUD_EXEC_ID" not in escapee.environ()
        assert os.getsid(pid) == pid  # it left the task's session
        assert not gone(pid)
        ex.close_session(session)
        assert gone(pid)  # close_session returns once the cgroup is empty
    finally:
        kill_all([pid])


def test_release_without_cgroups_still_kills_marked_escapees(
        tmp_path: Path, made: Callable[..., ProcessExecutor]) -> None:
    ex = made("off")
    session = open_session(ex, tmp_path)
    result, out = run(ex, session, "setsid nohup sleep 600 >/dev/null 2>&1 & echo $!")
    pid = int(out.text())
    try:
        assert result.exit_code == 0
        assert not gone(pid)
        ex.close_session(session)
        wait_for(lambda: gone(pid), message="the marked escapee survived its release")
    finally:
        kill_all([pid])


def _host(tmp_path: Path, mode: str, command: str) -> tuple[subprocess.Popen[bytes],
                                                                dict[str, object]]:
    """A process executor in a process of its own (tests/executors/process_host.py)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.executors.process_host", mode,
         str(tmp_path / "state"), command],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(f"the host exited {proc.returncode} before its command ran")
    info: dict[str, object] = json.loads(line)
    return proc, info


#: Background work of every kind: in the task's process group, in a session of its own
#: (with the markers), and out of both with the markers scrubbed. Prints the three pids.
BACKGROUND = ("sleep 600 & a=$!; setsid sleep 601 >/dev/null 2>&1 & b=$!; "
              + ESCAPE.replace("& echo $!", "& c=$!") + "; echo $a $b $c; sleep 602")


def test_background_commands_die_with_a_worker_killed_by_sigkill(
        mode: str, tmp_path: Path) -> None:
    # The reaper sees the worker's end of its pipe close and kills everything at once,
    # well within the heartbeat deadline (the worker is not even restarted here).
    proc, info = _host(tmp_path, mode, BACKGROUND)
    pids = [int(p) for p in info["pids"]]  # type: ignore[attr-defined]
    try:
        assert isinstance(info["reaper"], int)
        assert not any(gone(p) for p in pids)
        proc.kill()
        proc.wait(10)
        survivors = pids[2:] if mode == "off" else []  # the documented limit
        wait_for(lambda: all(gone(p) for p in pids if p not in survivors),
                 timeout=HEARTBEAT_DEADLINE_S, message="a command outlived its worker")
        wait_for(lambda: gone(int(info["reaper"])),  # type: ignore[call-overload]
                 message="the reaper did not exit")
        if mode != "off":
            assert not [p for p in Path("/sys/fs/cgroup").rglob("xcloud-*")
                        if p.name.endswith(str(proc.pid)) or f"-{proc.pid}-" in p.name]
    finally:
        kill_all(pids, tmp_path)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_restart_kills_what_a_run_without_its_reaper_left(
        mode: str, tmp_path: Path, made: Callable[..., ProcessExecutor]) -> None:
    # Reaper and worker killed together: the next run finds the previous cgroup tree in
    # the state dir (or, without cgroups, the task records and markers) and kills it.
    proc, info = _host(tmp_path, mode, BACKGROUND)
    pids = [int(p) for p in info["pids"]]  # type: ignore[attr-defined]
    try:
        os.kill(int(info["reaper"]), signal.SIGKILL)  # type: ignore[call-overload]
        proc.kill()
        proc.wait(10)
        assert not any(gone(p) for p in pids)
        if mode != "off":
            assert json.loads((tmp_path / "state" / STATE_FILE).read_text())["trees"]
        restarted = made(mode)
        assert restarted.cleanup_orphans(keep={"r1"}) >= 2
        survivors = pids[2:] if mode == "off" else []
        wait_for(lambda: all(gone(p) for p in pids if p not in survivors),
                 message="the restart left processes of the previous run")
        if mode != "off":
            assert json.loads((tmp_path / "state" / STATE_FILE).read_text())["trees"] == []
    finally:
        kill_all(pids, tmp_path)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_detection_reads_mountinfo_and_the_own_cgroup(tmp_path: Path) -> None:
    # Machines this one is not: pure v2, hybrid, read-only, nothing.
    for name in ("v2", "unified/sub", "freezer/own", "memory/own", "pids/own"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "v2" / "cgroup.controllers").write_text("cpu memory pids\n")
    pure = f"30 1 0:26 / {tmp_path / 'v2'} rw,nosuid - cgroup2 cgroup2 rw\n"
    hybrid = (f"31 1 0:27 / {tmp_path / 'unified'} rw - cgroup2 cgroup2 rw\n"
              f"32 1 0:28 / {tmp_path / 'freezer'} rw - cgroup cgroup rw,freezer\n"
              f"33 1 0:29 / {tmp_path / 'memory'} rw - cgroup cgroup rw,memory\n"
              f"34 1 0:30 / {tmp_path / 'pids'} ro - cgroup cgroup rw,pids\n")
    own = "6:freezer:/own\n4:memory:/own\n3:pids:/own\n0::/sub\n"

    layout = detect("auto", mountinfo=pure, proc_cgroup="0::/\n")
    assert (layout.version, layout.tracker) == (2, tmp_path / "v2")
    assert layout.memory == layout.pids == tmp_path / "v2"  # controllers available

    layout = detect("auto", mountinfo=hybrid, proc_cgroup=own)
    assert (layout.version, layout.tracker) == (1, tmp_path / "freezer" / "own")
    assert layout.memory == tmp_path / "memory" / "own"
    assert layout.pids is None  # mounted read-only: pids falls back to an rlimit

    layout = detect("v2", mountinfo=hybrid, proc_cgroup=own)
    assert (layout.version, layout.tracker) == (2, tmp_path / "unified" / "sub")
    assert layout.memory is None  # a hybrid's unified hierarchy has no controllers

    assert detect("v1", mountinfo=pure, proc_cgroup="0::/\n").version == 0
    assert detect("off", mountinfo=pure, proc_cgroup="0::/\n").mode == "none"
    none = detect("auto", mountinfo="", proc_cgroup="")
    assert (none.version, none.note) == (0, "no cgroup file system is mounted")
    assert detect("auto", mountinfo=pure.replace(" rw,nosuid ", " ro,nosuid "),
                  proc_cgroup="0::/\n").version == 0  # mounted read-only
    with pytest.raises(ExecutorError, match="process_cgroups"):
        detect("v3")


def test_a_single_command_session_keeps_no_cwd(made: Callable[..., ProcessExecutor],
                                               mode: str, tmp_path: Path) -> None:
    """A batch job's session (``carry_cwd=False``) runs one command: no ``.xcloud/cwd``
    is written (two inodes per job), and exit statuses, the gate and the limits stay as
    in a reservation's session."""
    ex = made(cgroups=mode)
    session = ex.open_session(SessionSpec(
        "a-1", tmp_path / "jobs" / "a-1" / "work", "alice",
        limits=Limits(memory_bytes=512 * 2**20, pids=64), carry_cwd=False))
    work = Path(session.workdir)
    result, out = run(ex, session, "mkdir d; cd d; pwd; exit 7")
    assert (result.exit_code, out.text()) == (7, f"{work}/d\n")
    assert run(ex, session, "false")[0].exit_code == 1
    assert run(ex, session, "if then fi")[0].exit_code == 2  # a syntax error
    _, out = run(ex, session, "pwd")
    assert out.text() == f"{work}\n"  # nothing carried
    assert sorted(p.name for p in work.iterdir()) == ["d"]  # no .xcloud
    ex.close_session(session)
    assert not work.exists()


def test_a_task_file_only_where_no_cgroup_finds_it(made: Callable[..., ProcessExecutor],
                                                   mode: str, tmp_path: Path) -> None:
    """In a cgroup a running task needs no record in ``<state_dir>/process/`` (the cgroup
    is what the reaper and a restart kill: an inode made and removed per command saved);
    without cgroups the record is what finds its process group."""
    ex = made(cgroups=mode)
    session = open_session(ex, tmp_path)
    handle, _ = start(ex, session, "while [ ! -e go ]; do sleep 0.01; done")
    records = sorted(p.name for p in ex.records_dir.glob("*.json")) \
        if ex.records_dir.is_dir() else []
    assert len(records) == (1 if mode == "off" else 0), records
    (Path(session.workdir) / "go").touch()
    result = ex.wait(handle, timeout=10)
    assert result is not None
    assert result.exit_code == 0
    assert not list(ex.records_dir.glob("*.json"))  # (glob of a missing dir: nothing)
    ex.close_session(session)


@pytest.mark.parametrize("wanted", ["v1", "v2"])
def test_removing_a_cgroup_takes_its_children_too(wanted: str) -> None:
    """``remove_cgroup`` tries one ``rmdir`` first (a session's emptied cgroup, the usual
    case) and walks only when that fails: a child cgroup (a job that made one) goes too,
    and so does a cgroup of the memory hierarchy, which lists many files."""
    from worker.executors.reaper import remove_cgroup

    layout = detect(_required(wanted))
    for parent in {p for p in (layout.tracker, layout.memory) if p is not None}:
        top = parent / f"xcloud-test-{os.getpid()}-{wanted}"
        (top / "child" / "grandchild").mkdir(parents=True)
        plain = parent / f"xcloud-test-{os.getpid()}-{wanted}-plain"
        plain.mkdir()
        try:
            assert remove_cgroup(str(top))
            assert not top.exists()
            assert remove_cgroup(str(plain))
            assert not plain.exists()
            assert remove_cgroup(str(plain))  # gone already: nothing to do
        finally:
            for leftover in (top / "child" / "grandchild", top / "child", top, plain):
                with contextlib.suppress(OSError):
                    leftover.rmdir()
