"""Files on a reservation as users reach them: ``xcloud cp`` as a child process, and the
shell's ``put`` / ``get`` (client/shell_commands.py), which must survive every copy
error.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from client.console import Console
from client.shell import run_line
from client.shell_commands import Shell
from tests.fixtures.grid import REPO, GridHarness
from tests.fixtures.transfer import make_file

MIB = 1 << 20
WID = "w1"


def xcloud(grid: GridHarness, principal: str, *args: str, cwd: Path
           ) -> subprocess.CompletedProcess[str]:
    env = grid.subprocess_env(XCLOUD_HOME=str(cwd / "home"), XCLOUD_BUS_URL=grid.url,
                              XCLOUD_BUS_ROOT=grid.root, XCLOUD_BUS_PRINCIPAL=principal,
                              XCLOUD_BUS_TOKEN=grid.token(principal, "client"),
                              XCLOUD_LOG_LEVEL="ERROR", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


#: The worker's heartbeat here: the copies hash and move megabytes in this process (the
#: worker's too), and on a loaded machine the harness's 0.2 s heartbeats (lost after 0.6 s)
#: once went missing long enough for w1 to be declared lost mid-copy. Nothing below is
#: about liveness.
HEARTBEAT_S = 1.0


def test_xcloud_cp(grid: GridHarness, tmp_path: Path) -> None:
    grid.start_coordinator()
    grid.start_worker(WID, heartbeat_s=HEARTBEAT_S)
    src = make_file(tmp_path / "in.dat", 2 * MIB + 5, seed=7)
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f.txt").write_text("f\n")

    # Nobody holds w1: reserved for the copy alone, and the user is told what that means.
    alone = xcloud(grid, "alice", "cp", "in.dat", f"{WID}:in.dat", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert "reserved for this copy only" in alone.stderr

    usage = xcloud(grid, "alice", "cp", "in.dat", "out.dat", cwd=tmp_path)
    assert usage.returncode == 2
    assert "WORKER:PATH" in usage.stderr

    # Alice holds w1 (as a shell would): cp uses that reservation and leaves it held.
    c = grid.client("alice", "client")
    with c.reserve(WID) as w:
        put = xcloud(grid, "alice", "cp", "in.dat", f"{WID}:data/in.dat", cwd=tmp_path)
        assert put.returncode == 0, put.stderr
        assert put.stderr == ""  # quiet in a pipe
        assert w.run("cmp data/in.dat data/in.dat && wc -c < data/in.dat").text.strip() \
            == str(src.stat().st_size)
        tree = xcloud(grid, "alice", "cp", "tree", ":", cwd=tmp_path)
        assert tree.returncode == 0, tree.stderr
        assert w.run("cat tree/sub/f.txt").text == "f\n"
        get = xcloud(grid, "alice", "cp", f"{WID}:data", "./back", cwd=tmp_path)
        assert get.returncode == 0, get.stderr
        assert (tmp_path / "back" / "in.dat").read_bytes() == src.read_bytes()
        refused = xcloud(grid, "alice", "cp", f"{WID}:../session.json", ".", cwd=tmp_path)
        assert refused.returncode == 1
        assert refused.stderr.startswith("xcloud: error: ")
        assert "outside" in refused.stderr or "refused" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert not w.ended


def test_shell_put_get_survive_errors(grid: GridHarness, tmp_path: Path) -> None:
    grid.start_coordinator()
    grid.start_worker(WID, heartbeat_s=HEARTBEAT_S)
    c = grid.client("alice", "client")
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(c, Console(out, err, False))
    src = make_file(tmp_path / "in.dat", MIB, seed=9)

    assert run_line(shell, f"put {src}")  # nothing reserved yet: an error, not the end
    assert "no worker reserved" in err.getvalue()
    assert run_line(shell, f"reserve {WID}")
    assert run_line(shell, f"put {src}")
    assert "put file" in out.getvalue()
    assert run_line(shell, f"put {tmp_path / 'missing'}")
    assert "no such file" in err.getvalue()
    assert run_line(shell, "get ../session.json")
    assert "`..` is refused" in err.getvalue()
    assert run_line(shell, "put")  # usage
    assert "usage: put" in err.getvalue()
    assert run_line(shell, f"get in.dat {tmp_path / 'back.dat'}")
    assert (tmp_path / "back.dat").read_bytes() == src.read_bytes()
    assert run_line(shell, "output wc -c < in.dat")
    assert str(src.stat().st_size) in out.getvalue()
    assert "internal error" not in err.getvalue()
    assert run_line(shell, "release")
