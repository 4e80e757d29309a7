"""ThreadReuse (worker/thread_reuse.py): calls never wait for one another or for a thread
to start, finished threads are reused, close lets every thread end."""

from __future__ import annotations

import threading

from tests.fixtures.services import wait_for
from worker.thread_reuse import ThreadReuse


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def test_calls_run_at_once_and_threads_are_reused() -> None:
    pool = ThreadReuse("reuse-a")
    release = threading.Event()
    idents: list[int] = []
    started = threading.Semaphore(0)

    def blocked() -> None:
        idents.append(threading.get_ident())
        started.release()
        release.wait(10)

    for _ in range(3):  # three calls that block: three threads, none waits for another
        pool.run(blocked)
    for _ in range(3):
        assert started.acquire(timeout=10)
    assert len(set(idents)) == 3
    release.set()
    wait_for(lambda: pool.idle == 3, timeout=10, message="three idle threads")
    done = threading.Event()
    again: list[int] = []

    def note() -> None:
        again.append(threading.get_ident())
        done.set()

    pool.run(note)
    assert done.wait(10)
    assert again[0] in idents  # an idle thread took it: no new thread
    assert len(_threads("reuse-a")) == 3
    pool.close()
    wait_for(lambda: not _threads("reuse-a"), timeout=10, message="threads ended")


def test_a_failing_call_keeps_its_thread_and_later_calls_run() -> None:
    pool = ThreadReuse("reuse-b")
    ran = threading.Event()

    def fail() -> None:
        raise RuntimeError("boom")

    pool.run(fail)
    wait_for(lambda: pool.idle == 1, timeout=10, message="the thread idle again")
    pool.run(ran.set)
    assert ran.wait(10)
    pool.close()
    wait_for(lambda: not _threads("reuse-b"), timeout=10, message="threads ended")


def test_idle_threads_end_by_themselves_and_calls_after_close_still_run() -> None:
    pool = ThreadReuse("reuse-c", idle_s=0.05)
    first = threading.Event()
    pool.run(first.set)
    assert first.wait(10)
    wait_for(lambda: not _threads("reuse-c"), timeout=10, message="idle thread ended")
    assert pool.idle == 0
    pool.close()
    late = threading.Event()
    pool.run(late.set)
    assert late.wait(10)
    wait_for(lambda: not _threads("reuse-c"), timeout=10, message="no thread kept")
