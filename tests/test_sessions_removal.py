"""remove_tree (worker/sessions.py): a session's directory goes whatever a command did to
it, and an entry that vanished meanwhile (another thread closing the same session) is not
an error. shutil.rmtree calls its error hook for os.open and os.scandir too: calling those
again without their arguments raised TypeError, which killed the worker's report thread."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from worker.sessions import _retry_removal, remove_tree


def test_an_entry_that_vanished_before_rmtree_opened_it_is_no_error(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    err = FileNotFoundError(2, "No such file or directory", str(gone))
    for func in (os.open, os.scandir, os.lstat, os.rmdir, os.unlink):
        _retry_removal(func, str(gone), err, str(gone))  # raised TypeError for os.open


def test_the_parent_of_the_tree_is_never_chmodded(tmp_path: Path) -> None:
    """A session dir whose parent is /tmp: an error on the dir itself chmodded /tmp to
    0700 (every other user, MariaDB's temp tables included, then lost /tmp)."""
    outer = tmp_path / "outer"
    outer.mkdir()
    outer.chmod(0o1777)
    top = outer / "session"
    err = FileNotFoundError(2, "No such file or directory", str(top))
    _retry_removal(os.rmdir, str(top), err, str(top))
    _retry_removal(os.open, str(top), err, str(top))
    assert stat.S_IMODE(outer.stat().st_mode) == 0o1777


def test_a_tree_with_read_only_directories_is_removed(tmp_path: Path) -> None:
    top = tmp_path / "session"
    locked = top / "work" / "locked"
    locked.mkdir(parents=True)
    (locked / "file").write_text("x")
    os.symlink("/etc", top / "work" / "link")  # removed, never followed
    locked.chmod(0o500)
    (top / "work").chmod(0o500)
    remove_tree(top)
    assert not top.exists()
    assert Path("/etc").is_dir()


def test_an_empty_dir_goes_and_a_link_to_one_never_removes_its_target(tmp_path: Path) -> None:
    """The usual case (a short job's empty work dir) is one rmdir; a symlink in its place
    is never followed (rmdir(2) does not follow the last component)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    remove_tree(empty)
    assert not empty.exists()
    remove_tree(empty)  # gone already: nothing to do
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    remove_tree(link)
    assert target.is_dir()
