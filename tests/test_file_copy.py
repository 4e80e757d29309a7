"""Files on a reservation: ``put`` / ``get`` between a client and the work directory of
the worker it holds (client/file_copy.py, worker/file_transfers.py), on both brokers.

A real coordinator and a real worker (the process executor, and the docker executor
where ``executor_kind`` says so) on the test grid; clients are ``client.api.Grid``s.
Checked: byte-exact round trips of a file and of a directory (nested, with an
executable bit and a link inside), that the command running in the reservation sees
and can change what was put (the docker bind mount), path escapes refused (``..``,
absolute, a link out, both ways), transfers without a valid grant or under another
user's grant refused, and the work directory gone after the release.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.transfer import Peer, TransferEndpoint, TransferRefused, TransferSettings
from client.api import Grid
from client.file_copy import CopyError, split_remote
from client.reservation import Refused, ReservedWorker
from tests.fixtures.grid import GridHarness, WorkerHandle
from tests.fixtures.services import BUSYBOX_IMAGE, wait_for
from tests.fixtures.transfer import make_file

MIB = 1 << 20
WID = "w1"


def start_worker(grid: GridHarness, executor: str, wid: str = WID) -> WorkerHandle:
    return grid.start_worker(wid, executor=executor)


def client(grid: GridHarness, principal: str) -> Grid:
    """A connected client whose Grid has its transfer endpoint (``Grid.transfers``)."""
    c = grid.client(principal, "client")
    return c


@pytest.fixture
def alice(grid: GridHarness) -> Iterator[tuple[Grid, ReservedWorker, WorkerHandle]]:
    grid.start_coordinator()
    worker = start_worker(grid, "process")
    c = client(grid, "alice")
    handle = c.reserve(WID)
    yield c, handle, worker
    handle.release()


def tree(root: Path) -> dict[str, Any]:
    """Relative path -> (kind, content digest or link target, executable bit)."""
    out: dict[str, Any] = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(top) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(),
                            os.access(path, os.X_OK))
    return out


def make_tree(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    make_file(root / "sub" / "blob.bin", 3 * MIB + 17, seed=5)
    (root / "sub" / "deeper" / "empty").write_bytes(b"")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    (root / "sub" / "link").symlink_to("blob.bin")
    return root


@pytest.mark.parametrize("executor", ["process", pytest.param("docker",
                                                              marks=pytest.mark.docker)])
def test_put_get_round_trip(grid: GridHarness, tmp_path: Path, executor: str,
                            request: pytest.FixtureRequest) -> None:
    if executor == "docker":
        request.getfixturevalue("docker_image")(BUSYBOX_IMAGE)
    grid.start_coordinator()
    start_worker(grid, executor)
    c = client(grid, "alice")
    src = make_file(tmp_path / "in.dat", 5 * MIB + 123, seed=2)
    local_tree = make_tree(tmp_path / "project")
    with c.reserve(WID) as w:
        done: list[tuple[int, int]] = []
        put = w.put(src, "in.dat", progress=lambda d, t: done.append((d, t)))
        assert (put.size, put.remote, put.directory) == (src.stat().st_size, "in.dat", False)
        assert done[-1] == (put.size, put.size)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        assert put.sha256 == digest
        # The command in the reservation sees it (docker: through the bind mount)...
        seen = w.run("sha256sum in.dat")
        assert seen.returncode == 0
        assert seen.text.split()[0] == digest
        dir_put = w.put(local_tree)  # default: its own name
        assert dir_put.directory
        assert dir_put.remote == "project"
        # ...and may change it (docker: handed to the container's user).
        edit = w.run("echo more >> project/a.txt && ./project/run.sh && mkdir out && "
                     "cp in.dat out/copy.dat && echo done > out/note")
        assert edit.returncode == 0, edit.text
        assert "hi" in edit.text
        back = tmp_path / "back.dat"
        got = w.get("in.dat", back)
        assert got.sha256 == digest
        assert back.read_bytes() == src.read_bytes()
        got_tree = w.get("project", tmp_path / "back-project")
        assert got_tree.directory
        expected = tree(local_tree)
        expected["a.txt"] = ("file", hashlib.sha256(b"alpha\nmore\n").hexdigest(), False)
        assert tree(tmp_path / "back-project") == expected
        # A directory into an existing directory keeps its name (as cp does).
        (tmp_path / "results").mkdir()
        w.get("out", tmp_path / "results")
        assert (tmp_path / "results" / "out" / "copy.dat").read_bytes() == src.read_bytes()
        assert (tmp_path / "results" / "out" / "note").read_text() == "done\n"
        # Into a subdirectory that does not exist yet: created.
        w.put(tmp_path / "project" / "a.txt", "new/dir/a.txt")
        assert w.run("cat new/dir/a.txt").text == "alpha\n"
        if executor == "docker":  # the container's own absolute paths are accepted
            w.put(tmp_path / "project" / "a.txt", "/work/abs.txt")
            assert w.run("cat /work/abs.txt").text == "alpha\n"
            w.get("/work/abs.txt", tmp_path / "abs.txt")
            assert (tmp_path / "abs.txt").read_text() == "alpha\n"
    # Nothing of the transfers is left beside what was asked for.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_path_escapes_are_refused(alice: tuple[Grid, ReservedWorker, WorkerHandle],
                                  tmp_path: Path) -> None:
    _, w, _ = alice
    src = tmp_path / "x"
    src.write_text("x\n")
    assert w.run("ln -s /etc etc-link && ln -s .. up && mkdir d && ln -s ../d d/self"
                 ).returncode == 0
    for remote in ("../x", "/etc/xcloud-test", "a/../../x", "etc-link/x", "up/x"):
        with pytest.raises(Refused) as err:
            w.put(src, remote)
        assert err.value.code == "forbidden", remote
    for remote in ("../session.json", "/etc/passwd", "etc-link/passwd", "up/session.json",
                   "etc-link"):
        with pytest.raises(Refused) as err:
            w.get(remote, tmp_path / "stolen")
        assert err.value.code == "forbidden", remote
    assert not (tmp_path / "stolen").exists()
    assert not Path("/etc/xcloud-test").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # A link that stays inside is fine.
    w.put(src, "d/self/x")
    assert w.run("cat d/x").text == "x\n"
    with pytest.raises(Refused) as err:
        w.get("missing.txt", tmp_path / "m")
    assert err.value.code == "not_found"
    with pytest.raises(CopyError):
        w.put(tmp_path / "does-not-exist")


def test_no_grant_or_another_users_grant_is_refused(
        grid: GridHarness, alice: tuple[Grid, ReservedWorker, WorkerHandle],
        tmp_path: Path) -> None:
    _, w, _ = alice
    src = tmp_path / "x"
    src.write_text("x\n")
    w.put(src, "x")
    bus = grid.bus("mallory", "client", inbox=grid.topics.client_inbox("mallory"),
                   start=False)
    mallory = TransferEndpoint(bus, settings=TransferSettings(stall_timeout_s=5))
    try:
        bus.start(timeout=5)
        peer = Peer.worker(grid.topics, WID)
        purposes: list[dict[str, Any]] = [
            {"kind": "workdir", "path": "x"},  # no grant
            {"kind": "workdir", "path": "x", "grant": w.grant},  # alice's grant
            {"kind": "workdir", "path": "x", "grant": "A" * 40 + "." + "B" * 40},
        ]
        for purpose in purposes:
            with pytest.raises(TransferRefused) as err:
                mallory.upload(peer, src, purpose=purpose)
            assert err.value.code == "forbidden"
            with pytest.raises(TransferRefused) as err:
                mallory.download(peer, purpose, tmp_path / "stolen")
            assert err.value.code == "forbidden"
        with pytest.raises(TransferRefused) as err:
            mallory.upload(peer, src, purpose={"kind": "data", "name": "x"})
        assert err.value.code == "unsupported"
        assert not (tmp_path / "stolen").exists()
    finally:
        mallory.close()
    assert w.run("cat x").text == "x\n"  # untouched


def test_files_are_gone_after_release(grid: GridHarness, tmp_path: Path) -> None:
    grid.start_coordinator()
    worker = start_worker(grid, "process")
    c = client(grid, "alice")
    src = make_file(tmp_path / "in.dat", MIB, seed=3)
    w = c.reserve(WID)
    w.put(src)
    assert worker.agent is not None
    assert worker.agent.exec_service is not None
    session_dir = worker.agent.exec_service.store.path(w.id)
    assert (session_dir / "work" / "in.dat").read_bytes() == src.read_bytes()
    grant = w.grant
    w.release()
    wait_for(lambda: not session_dir.exists(), timeout=10,
             message="the session directory outlived the release")
    # The old grant no longer opens anything.
    with pytest.raises(TransferRefused) as err:
        c.transfers.download(Peer.worker(grid.topics, WID),
                             {"kind": "workdir", "path": "in.dat", "grant": grant},
                             tmp_path / "late")
    assert err.value.code == "forbidden"


def test_split_remote() -> None:
    assert split_remote("w1:in.dat") == ("w1", "in.dat")
    assert split_remote(":out/") == ("", "out/")
    assert split_remote("./a:b") is None
    assert split_remote("plain") is None
    assert split_remote("3:") == ("3", "")


def test_no_room_on_the_worker_is_refused(alice: tuple[Grid, ReservedWorker, WorkerHandle],
                                          tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import worker.file_transfers as files

    _, w, _ = alice
    src = make_file(tmp_path / "in.dat", MIB, seed=4)
    real = shutil.disk_usage

    def nearly_full(path: Any) -> Any:
        usage = real(path)
        return usage._replace(free=files.FREE_MARGIN + MIB - 1)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(Refused) as err:
        w.put(src)
    assert err.value.code == "too_large"
    assert "bytes free" in str(err.value)
    assert w.run("ls").text == ""  # nothing arrived
    monkeypatch.setattr(shutil, "disk_usage", real)
    w.put(src)
    assert w.run("wc -c < in.dat").text.strip() == str(MIB)


def test_progress_bar_only_on_a_terminal() -> None:
    import io

    from client.file_copy import ProgressBar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    bar = ProgressBar("in.dat", term)
    bar(0, 4 * MIB)
    bar(4 * MIB, 4 * MIB)
    bar.finish()
    shown = term.getvalue()
    assert "in.dat" in shown
    assert "100%" in shown
    assert "MiB/s" in shown
    assert "ETA" in shown
    assert shown.endswith("\n")
    pipe = io.StringIO()
    quiet = ProgressBar("in.dat", pipe)
    quiet(1, 2)
    quiet.finish()
    assert pipe.getvalue() == ""
