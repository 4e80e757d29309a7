"""coordinator/job_apps.py ``pin``: the app snapshot stored in a job comes from the
store, never from the submitter. jobs.submit's app object accepts ``sha256`` and ``size``
(the pinned form of an image_archive app), so a submitter could name another owner's data
object there; it must be replaced by the app's own archive, or dropped."""

from __future__ import annotations

from typing import Any

from coordinator.job_apps import pin
from coordinator.store.apps import AppRecord, Binary

MINE = "a" * 64
VICTIMS = "b" * 64


class _Apps:
    def __init__(self, *apps: AppRecord) -> None:
        self.apps = apps

    def app_versions(self, owner: str, name: str) -> list[AppRecord]:
        return [a for a in self.apps if a.owner == owner and a.name == name]


def test_a_forged_archive_or_binary_in_the_submit_is_replaced_by_the_apps_own() -> None:
    store: Any = _Apps(
        AppRecord(id="1", owner="alice", name="tool", version="1", kind="image_archive",
                  sha256=MINE, size=10),
        AppRecord(id="2", owner="alice", name="sim", version="1", kind="binaries",
                  binaries=(Binary("linux/amd64", MINE, 5),)),
        AppRecord(id="3", owner="alice", name="echo", version="1", kind="command",
                  command="echo"))
    tool = pin(store, "alice", {"app": {"name": "tool", "sha256": VICTIMS, "size": 1},
                                "args": ["run"]}, admin=False, index=0)
    assert (tool["app"]["sha256"], tool["app"]["size"]) == (MINE, 10)
    sim = pin(store, "alice", {"app": {"name": "sim", "binaries": {"linux/amd64": VICTIMS}},
                               "args": []}, admin=False, index=1)
    assert sim["app"]["binaries"] == {"linux/amd64": MINE}
    echo = pin(store, "alice", {"app": {"name": "echo", "sha256": VICTIMS}, "args": ["hi"]},
               admin=False, index=2)
    assert "sha256" not in echo["app"]
