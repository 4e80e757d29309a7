"""The worker's attempt journal (worker/attempt_journal.py) and the AttemptStore on it
(worker/job_attempts.py): one append-only file instead of a record file per write."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from worker.attempt_journal import AttemptJournal
from worker.job_attempts import AttemptRecord, AttemptStore


def record(attempt: str, phase: str = "assigned", **extra: Any) -> AttemptRecord:
    return AttemptRecord(attempt=attempt, job=f"j-{attempt}", owner="alice",
                         spec={"command": "true"}, inputs=[], phase=phase, **extra)


def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "jobs" / "attempts.journal"


def replayed(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """What a restart would read (a fresh journal on the same file)."""
    return AttemptJournal(journal_path(tmp_path)).replay()


def test_puts_and_dels_replay(tmp_path: Path) -> None:
    store = AttemptStore(tmp_path)
    store.save(record("a-1"))
    store.save(record("a-2"), durable=True)
    store.save(record("a-3"))
    store.remove("a-2")
    assert set(replayed(tmp_path)) == {"a-1", "a-3"}
    lines = journal_path(tmp_path).read_bytes().splitlines()
    assert [next(iter(json.loads(line))) for line in lines] == ["put", "put", "put", "del"]
    assert json.loads(lines[-1]) == {"del": "a-2"}
    assert [r.attempt for r in AttemptStore(tmp_path).load_all()] == ["a-1", "a-3"]


def test_the_last_put_of_an_attempt_wins(tmp_path: Path) -> None:
    store = AttemptStore(tmp_path)
    store.save(record("a-1"), durable=True)
    store.save(record("a-1", "finished", result={"kind": "success"}))
    store.save(record("a-1", "reported", report={"kind": "success"}), durable=True)
    assert replayed(tmp_path)["a-1"]["phase"] == "reported"
    (loaded,) = AttemptStore(tmp_path).load_all()
    assert (loaded.phase, loaded.report) == ("reported", {"kind": "success"})


def test_a_torn_last_line_is_ignored(tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    store = AttemptStore(tmp_path)
    store.save(record("a-1"), durable=True)
    store.save(record("a-2"))
    with journal_path(tmp_path).open("ab") as out:  # a crash in the middle of an append
        out.write(b'{"put":{"attempt":"a-3","job":"j-')
    with caplog.at_level(logging.INFO, logger="worker.attempt_journal"):
        assert set(replayed(tmp_path)) == {"a-1", "a-2"}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # a save before any load_all ends the torn line: the new entry is not glued to it
    AttemptStore(tmp_path).save(record("a-4"))
    assert set(replayed(tmp_path)) == {"a-1", "a-2", "a-4"}
    assert [r.attempt for r in AttemptStore(tmp_path).load_all()] == ["a-1", "a-2", "a-4"]
    assert b"a-3" not in journal_path(tmp_path).read_bytes()  # compacted away


def test_a_garbage_line_in_the_middle_is_skipped_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = AttemptStore(tmp_path)
    store.save(record("a-1"))
    with journal_path(tmp_path).open("ab") as out:
        out.write(b"\x00\x00not json\n")
        out.write(b'{"neither":"put nor del"}\n')
    store.save(record("a-2"))
    store.remove("a-1")
    with caplog.at_level(logging.WARNING, logger="worker.attempt_journal"):
        assert set(replayed(tmp_path)) == {"a-2"}  # the entries after the garbage count
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skipped) == 2
    assert "line 2" in skipped[0]
    assert "line 3" in skipped[1]


def test_unusable_records_are_dropped_on_load(tmp_path: Path) -> None:
    store = AttemptStore(tmp_path)
    store.save(record("a-1"))
    store.save(record("a-2", "reported"))
    store.journal.put({"attempt": "a-2", "job": "j", "phase": "exploded"})
    assert [r.attempt for r in AttemptStore(tmp_path).load_all()] == ["a-1"]
    assert set(replayed(tmp_path)) == {"a-1"}
    assert not (tmp_path / "jobs" / "a-2").exists()


def test_load_all_compacts_to_the_live_records(tmp_path: Path) -> None:
    store = AttemptStore(tmp_path)
    for i in range(50):
        store.save(record(f"a-{i:02d}"), durable=True)
        store.save(record(f"a-{i:02d}", "reported", report={"kind": "success"}))
        if i % 10:
            store.remove(f"a-{i:02d}")
    before = journal_path(tmp_path).stat().st_size
    live = ["a-00", "a-10", "a-20", "a-30", "a-40"]
    again = AttemptStore(tmp_path)
    assert [r.attempt for r in again.load_all()] == live
    lines = journal_path(tmp_path).read_bytes().splitlines()
    assert len(lines) == len(live)
    assert journal_path(tmp_path).stat().st_size < before / 10
    assert not (tmp_path / "jobs" / "attempts.journal.tmp").exists()
    again.save(record("a-50"))  # appends to the compacted file
    assert set(replayed(tmp_path)) == {*live, "a-50"}


def test_the_journal_is_compacted_when_it_grows_past_the_threshold(tmp_path: Path) -> None:
    path = tmp_path / "attempts.journal"
    journal = AttemptJournal(path, compact_bytes=2000)
    line = len(json.dumps({"put": record("a-1").to_dict()}, separators=(",", ":"))) + 1
    for i in range(200):
        journal.put(record("a-1", "reported", report={"n": i}).to_dict())
        journal.put(record(f"b-{i}").to_dict())
        journal.delete(f"b-{i}")
        assert path.stat().st_size <= 2000 + 2 * line + 100
    assert AttemptJournal(path).replay() == {
        "a-1": record("a-1", "reported", report={"n": 199}).to_dict()}


def test_concurrent_saves_replay_to_exactly_what_was_saved(tmp_path: Path) -> None:
    store = AttemptStore(tmp_path, compact_bytes=20_000)  # compactions under way too
    start = threading.Barrier(8)
    expected: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            start.wait()
            for i in range(60):
                attempt = f"a-{n}-{i:02d}"
                store.save(record(attempt), durable=i % 3 == 0)
                last = record(attempt, "reported", report={"n": n, "i": i})
                store.save(last, durable=i % 2 == 0)
                if i % 4 == 0:
                    store.remove(attempt)
                else:
                    with lock:
                        expected[attempt] = last.to_dict()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert replayed(tmp_path) == expected
    assert {r.attempt: r.to_dict() for r in AttemptStore(tmp_path).load_all()} == expected


def test_old_attempt_json_records_are_taken_over(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    for attempt, phase in (("a-old", "reported"), ("a-both", "assigned")):
        (jobs / attempt / "work").mkdir(parents=True)
        (jobs / attempt / "attempt.json").write_text(
            json.dumps(record(attempt, phase, report={"kind": "success"}).to_dict()))
    (jobs / "a-junk").mkdir()
    (jobs / "a-junk" / "attempt.json").write_text("{truncated")
    AttemptStore(tmp_path).save(record("a-both", "finished"))  # the journal wins
    loaded = AttemptStore(tmp_path).load_all()
    assert [(r.attempt, r.phase) for r in loaded] == [("a-both", "finished"),
                                                      ("a-old", "reported")]
    assert not list(jobs.glob("*/attempt.json"))
    assert (jobs / "a-old" / "work").is_dir()
    assert not (jobs / "a-junk").exists()
    assert {a: r["phase"] for a, r in replayed(tmp_path).items()} == {
        "a-both": "finished", "a-old": "reported"}


def test_load_all_removes_what_has_no_record(tmp_path: Path) -> None:
    store = AttemptStore(tmp_path)
    store.save(record("a-2"))
    store.save(record("a-1"))
    jobs = tmp_path / "jobs"
    (jobs / "a-orphan" / "work").mkdir(parents=True)
    (jobs / "stray").write_text("x")
    assert [r.attempt for r in AttemptStore(tmp_path).load_all()] == ["a-1", "a-2"]
    assert sorted(p.name for p in jobs.iterdir()) == ["a-1", "a-2", "attempts.journal"]


def test_save_makes_the_directory_and_remove_deletes_it(tmp_path: Path) -> None:
    store = AttemptStore(tmp_path)
    store.save(record("a-1"))
    directory = tmp_path / "jobs" / "a-1"
    assert directory.is_dir()
    assert directory.stat().st_mode & 0o777 == 0o700
    store.workdir("a-1").mkdir()
    (store.workdir("a-1") / "file").write_text("x")
    (directory / "stdout").write_text("out")
    store.save(record("a-1", "reported"))
    store.remove("a-1")
    assert not directory.exists()
    assert replayed(tmp_path) == {}
    assert journal_path(tmp_path).stat().st_mode & 0o777 == 0o600


def test_only_durable_saves_are_fdatasynced(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = journal_path(tmp_path)
    synced: list[bytes] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        synced.append(path.read_bytes())  # what the sync makes durable
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    store = AttemptStore(tmp_path)
    store.save(record("a-1"))
    store.save(record("a-2", "finished"))
    store.remove("a-2")
    assert synced == []
    store.save(record("a-1", "reported"), durable=True)
    assert len(synced) == 1
    assert json.loads(synced[0].splitlines()[-1])["put"]["phase"] == "reported"
    store.save(record("a-3"))
    assert len(synced) == 1
