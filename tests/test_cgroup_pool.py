"""A closed session's cgroup is kept for the next session (worker/executors/cgroups.py,
"pooled"): the next one gets it with exactly its own limits (those of the previous
session lifted, v1's memory and memsw written in an order the kernel accepts), an OOM
kill of the previous session is not counted as its own, and a cgroup that something
outlived (a process, a child cgroup) is never shared: it is removed, and a name another
cgroup still has gives the new one a name of its own. On cgroup v1 and v2 (hybrid: v2
without the memory and pids controllers) as the machine gives them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.executors.harness import run
from tests.fixtures.services import wait_for
from tests.test_process_executor import _required
from worker.executors.base import Limits, SessionHandle, SessionSpec
from worker.executors.cgroups import SessionCgroup
from worker.executors.process import ProcessExecutor

MB = 2**20
V1_UNLIMITED = 9223372036854771712  # memory.limit_in_bytes with no limit (-1 written)


@pytest.fixture(params=["v1", "v2"])
def ex(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessExecutor]:
    executor = ProcessExecutor(tmp_path / "state", kill_grace_s=1.0,
                               cgroups=_required(str(request.param)))
    yield executor
    executor.close()


def session(ex: ProcessExecutor, tmp_path: Path, rid: str,
            limits: Limits | None = None) -> SessionHandle:
    return ex.open_session(SessionSpec(rid, tmp_path / "sessions" / rid, "alice",
                                       limits=limits or Limits(), carry_cwd=False))


def cgroup_of(ex: ProcessExecutor, rid: str) -> SessionCgroup:
    cgroup = ex.containment.existing(rid)
    assert cgroup is not None
    return cgroup


def memory_files(cgroup: SessionCgroup) -> dict[str, int]:
    """v1: the memory and memsw limits as the kernel has them."""
    assert cgroup.memory is not None
    return {name: int((cgroup.memory / f"memory.{name}limit_in_bytes").read_text())
            for name in ("", "memsw.")}


def test_the_next_session_gets_the_cgroup_with_its_own_limits(
        ex: ProcessExecutor, tmp_path: Path) -> None:
    first = session(ex, tmp_path, "r1", Limits(memory_bytes=300 * MB, pids=50))
    cgroup = cgroup_of(ex, "r1")
    assert run(ex, first, "true")[0].exit_code == 0
    ex.close_session(first)
    # each next session: a limit lifted, raised, lowered (memsw above memory throughout)
    for rid, limits in (("r2", Limits()), ("r3", Limits(memory_bytes=600 * MB)),
                        ("r4", Limits(memory_bytes=400 * MB)),
                        ("r5", Limits(memory_bytes=800 * MB, pids=20)),
                        ("r6", Limits(memory_bytes=200 * MB))):
        handle = session(ex, tmp_path, rid, limits)
        assert cgroup_of(ex, rid) is cgroup  # the same cgroup: none was made
        if ex.containment.tree is not None and ex.containment.tree.version == 1:
            assert cgroup.tracker.name == f"s-{rid}"  # renamed (v2 cannot rename)
        if cgroup.memory is not None:
            want = limits.memory_bytes or V1_UNLIMITED
            if (cgroup.memory / "memory.max").exists():
                assert (cgroup.memory / "memory.max").read_text().strip() == (
                    str(limits.memory_bytes) if limits.memory_bytes else "max")
            else:
                assert memory_files(cgroup) == {"": want, "memsw.": want}
            assert ("memory_bytes" in cgroup.limited) == bool(limits.memory_bytes)
        if cgroup.pids is not None:
            assert (cgroup.pids / "pids.max").read_text().strip() == (
                str(limits.pids) if limits.pids else "max")
            assert ("pids" in cgroup.limited) == bool(limits.pids)
        result, out = run(ex, handle, "echo ran")
        assert (result.exit_code, out.text()) == (0, "ran\n")
        ex.close_session(handle)


@pytest.mark.parametrize("ex", ["v1"], indirect=True)  # (where the memory limit is)
def test_an_oom_kill_of_the_previous_session_is_not_the_next_ones(
        ex: ProcessExecutor, tmp_path: Path) -> None:
    first = session(ex, tmp_path, "r1", Limits(memory_bytes=300 * MB))
    assert "memory_bytes" in cgroup_of(ex, "r1").limited
    result, _ = run(ex, first, "python3 -c 'x = bytearray(600 * 2**20); "
                               "x[::4096] = b\"1\" * (len(x) // 4096)'")
    assert result.oom_killed
    ex.close_session(first)
    second = session(ex, tmp_path, "r2", Limits(memory_bytes=300 * MB))
    assert cgroup_of(ex, "r2").tracker.exists()
    result, _ = run(ex, second, "true")
    assert result.exit_code == 0
    assert not result.oom_killed


def test_a_cgroup_with_a_child_cgroup_is_removed_not_kept(ex: ProcessExecutor,
                                                          tmp_path: Path) -> None:
    first = session(ex, tmp_path, "r1")
    cgroup = cgroup_of(ex, "r1")
    (cgroup.tracker / "made-by-the-command").mkdir()  # as a root command can
    ex.close_session(first)
    assert not any(d.exists() for d in cgroup.dirs)  # removed, child and all
    session(ex, tmp_path, "r2")
    assert cgroup_of(ex, "r2") is not cgroup


def test_a_process_in_a_child_cgroup_is_killed_at_the_close(ex: ProcessExecutor,
                                                              tmp_path: Path) -> None:
    """A session's sweep reads only its own cgroup when it has no child (a kernfs
    directory's link count says so: reaper.cgroup_dirs); one with a child cgroup is
    walked, and what hides there dies with the session."""
    first = session(ex, tmp_path, "r1")
    child = cgroup_of(ex, "r1").tracker / "made-by-the-command"
    result, out = run(ex, first, f"mkdir {child} && sh -c 'echo $$ > {child}/cgroup.procs; "
                                 f"exec sleep 60' </dev/null >/dev/null 2>&1 & echo $!")
    assert result.exit_code == 0, out.text()
    pid = int(out.text().split()[-1])
    wait_for(lambda: str(pid) in (child / "cgroup.procs").read_text().split(), timeout=10,
             message="the sleep in the child cgroup")
    ex.close_session(first)
    wait_for(lambda: not _alive(pid), timeout=10, message=f"process {pid} still alive")
    assert not child.exists()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_name_still_taken_gives_the_new_cgroup_one_of_its_own(ex: ProcessExecutor,
                                                               tmp_path: Path) -> None:
    session(ex, tmp_path, "r0")  # makes the tree
    tree = ex.containment.tree
    assert tree is not None
    left = tree.roots[0] / "s-r1"
    left.mkdir()  # e.g. a cgroup whose processes outlived its session's close
    session(ex, tmp_path, "r1")
    cgroup = cgroup_of(ex, "r1")
    assert cgroup.tracker.name == "s-r1.1"
    assert left.is_dir()
    assert cgroup.tracker != left


@pytest.mark.parametrize("ex", ["v1"], indirect=True)  # (where the memory limit is)
def test_a_limit_a_command_changed_is_written_again(ex: ProcessExecutor,
                                                    tmp_path: Path) -> None:
    """A command running as root may write its own cgroup's files: the next session of
    the pooled cgroup gets its limits written, not assumed."""
    first = session(ex, tmp_path, "r1", Limits(memory_bytes=300 * MB, pids=50))
    cgroup = cgroup_of(ex, "r1")
    assert cgroup.memory is not None
    assert cgroup.pids is not None
    for name in ("memory.memsw.limit_in_bytes", "memory.limit_in_bytes"):  # (raised)
        (cgroup.memory / name).write_text(str(900 * MB))
    (cgroup.pids / "pids.max").write_text("max")
    ex.close_session(first)
    session(ex, tmp_path, "r2", Limits(memory_bytes=300 * MB, pids=50))
    assert cgroup_of(ex, "r2") is cgroup
    assert memory_files(cgroup) == {"": 300 * MB, "memsw.": 300 * MB}
    assert (cgroup.pids / "pids.max").read_text().strip() == "50"


@pytest.mark.parametrize("ex", ["v1"], indirect=True)
def test_a_cgroup_still_charged_with_a_tmpfs_file_is_not_kept(ex: ProcessExecutor,
                                                              tmp_path: Path) -> None:
    """A file left in /dev/shm stays charged to the cgroup that wrote it: kept, it would
    count against the next session's limit. Removed, its charge goes to the parent."""
    shm = Path("/dev/shm") / f"xcloud-test-{tmp_path.name}"
    try:
        first = session(ex, tmp_path, "r1", Limits(memory_bytes=300 * MB))
        cgroup = cgroup_of(ex, "r1")
        result, _ = run(ex, first, f"head -c {32 * MB} /dev/zero > {shm}")
        assert result.exit_code == 0
        ex.close_session(first)
        assert not cgroup.tracker.exists()  # removed
        session(ex, tmp_path, "r2", Limits(memory_bytes=300 * MB))
        fresh = cgroup_of(ex, "r2")
        assert fresh is not cgroup
        assert fresh.charged() < 8 * MB
    finally:
        shm.unlink(missing_ok=True)
