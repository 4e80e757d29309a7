"""remove_tree (worker/sessions.py): a session's directory goes whatever a command did to
it, and an entry that vanished meanwhile (another thread closing the same session) is not
an error. shutil.rmtree calls its error hook for os.open and os.scandir too: calling those
again without their arguments raised TypeError, which killed the worker's report thread."""

from __future__ import annotations

import os
from pathlib import Path

from worker.sessions import _retry_removal, remove_tree


def test_an_entry_that_vanished_before_rmtree_opened_it_is_no_error(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    err = FileNotFoundError(2, "No such file or directory", str(gone))
    for func in (os.open, os.scandir, os.lstat, os.rmdir, os.unlink):
        _retry_removal(func, str(gone), err)  # raised TypeError for os.open


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
