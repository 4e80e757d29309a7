"""The worker's input cache (worker/input_cache.py): fetch once, LRU under a size cap,
held entries never evicted, order kept across a restart, failures seen by every waiter."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from worker.input_cache import CacheError, InputCache


def blob(i: int, size: int = 100) -> tuple[str, bytes]:
    data = bytes([i % 256]) * size
    return hashlib.sha256(data).hexdigest(), data


class Origin:
    """What the coordinator would serve: a dict of hash -> bytes, counting fetches."""

    def __init__(self, *items: tuple[str, bytes]) -> None:
        self.data = dict(items)
        self.calls: list[str] = []
        self.gate: threading.Event | None = None
        self.lock = threading.Lock()

    def __call__(self, sha256: str, dest: Path) -> None:
        with self.lock:
            self.calls.append(sha256)
        if self.gate is not None:
            assert self.gate.wait(10)
        if sha256 not in self.data:
            raise OSError("not found on the coordinator")
        dest.write_bytes(self.data[sha256])


def test_fetches_once_then_hits(tmp_path: Path) -> None:
    sha, data = blob(1)
    origin = Origin((sha, data))
    cache = InputCache(tmp_path / "c", 10_000, origin)
    assert cache.get(sha).read_bytes() == data
    assert cache.get(sha).read_bytes() == data
    assert origin.calls == [sha]
    assert (cache.fetches, cache.hits) == (1, 1)
    assert cache.summary() == [sha]


def test_concurrent_requests_fetch_once(tmp_path: Path) -> None:
    sha, data = blob(2)
    origin = Origin((sha, data))
    origin.gate = threading.Event()
    cache = InputCache(tmp_path / "c", 10_000, origin)
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(sha).read_bytes()))
               for _ in range(8)]
    for t in threads:
        t.start()
    origin.gate.set()
    for t in threads:
        t.join(10)
    assert got == [data] * 8
    assert origin.calls == [sha]


def test_lru_eviction_spares_recent_and_held(tmp_path: Path) -> None:
    items = [blob(i) for i in range(5)]  # 100 bytes each; the cap holds 3
    origin = Origin(*items)
    cache = InputCache(tmp_path / "c", 300, origin)
    a, b, c, d, e = (sha for sha, _ in items)
    for sha in (a, b, c):
        cache.get(sha)
    cache.get(a)  # a is now the most recently used: b is the oldest
    cache.get(d)
    assert not cache.holds(b)
    assert not cache.path(b).exists()
    assert all(cache.holds(x) for x in (a, c, d))
    with cache.use(c):  # the least recently used (c) is held: the next oldest (a) goes
        cache.get(e)
        assert cache.holds(c)
        assert not cache.holds(a)
    assert cache.size_bytes <= 300
    assert cache.evictions == 2
    assert cache.summary() == [e, c, d]


def test_order_survives_a_restart(tmp_path: Path) -> None:
    items = [blob(i) for i in range(3)]
    origin = Origin(*items)
    cache = InputCache(tmp_path / "c", 1000, origin)
    for sha, _ in items:
        cache.get(sha)
    first = items[0][0]
    cache.get(first)  # used last
    again = InputCache(tmp_path / "c", 200, origin)  # a smaller cap: the oldest goes
    assert again.summary() == [first, items[2][0]]
    assert again.get(first).read_bytes() == items[0][1]
    assert origin.calls.count(first) == 1


def test_failures_reach_every_waiter_and_leave_nothing(tmp_path: Path) -> None:
    sha, _ = blob(9)
    origin = Origin()
    origin.gate = threading.Event()
    cache = InputCache(tmp_path / "c", 1000, origin)
    errors: list[str] = []

    def get() -> None:
        try:
            cache.get(sha)
        except CacheError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=get) for _ in range(3)]
    for t in threads:
        t.start()
    origin.gate.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 3
    assert all("not found" in e for e in errors)
    assert not cache.holds(sha)
    assert not cache.path(sha).exists()
    with pytest.raises(CacheError, match="not a sha256"):
        cache.get("../etc/passwd")
