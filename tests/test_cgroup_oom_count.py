"""``SessionCgroup.oom_kills`` reads nothing for a cgroup this run just made and nothing
ran in (a job's session: one read per job, not two), and keeps the file it found."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.executors import reaper
from worker.executors.cgroups import SessionCgroup


def test_a_fresh_cgroup_is_not_read_and_the_count_file_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (tmp_path / "cgroup.procs").write_text("")
    reads: list[str] = []
    real = reaper._read

    def counted(path: str) -> str:
        reads.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(reaper, "_read", counted)
    cgroup = SessionCgroup([tmp_path], memory=tmp_path, fresh=True)
    assert cgroup.oom_kills() == 0
    assert reads == []  # made by this run, nothing in it yet: no OOM kill to read
    cgroup.attach(12345)  # (a plain file here)
    assert cgroup.oom_kills() == 3
    assert reads == ["memory.events", "memory.oom_control"]  # v2's file first, then v1's
    assert cgroup.oom_kills() == 3
    assert reads[2:] == ["memory.oom_control"]  # the file found is kept


def test_a_cgroup_found_made_is_read(tmp_path: Path) -> None:
    """One this run did not make (a restart's, or mkdir found it) may have had kills."""
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 1\noom 1\noom_kill 1\n")
    assert SessionCgroup([tmp_path], memory=tmp_path).oom_kills() == 1
