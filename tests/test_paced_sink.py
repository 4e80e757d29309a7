"""``paced_sink``: which output sinks the executors may pause (worker/executors/base.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from worker.executors.base import paced_sink


class Paced:
    def __call__(self, stream: str, data: bytes) -> None:
        pass

    def offer(self, stream: str, data: bytes, on_room: Callable[[], None]) -> bool:  # noqa: ARG002
        return True

    def feed(self, stream: str, data: bytes) -> None:
        pass


class OfferOnly:  # not callable: not a sink at all
    def offer(self, stream: str, data: bytes, on_room: Callable[[], None]) -> bool:  # noqa: ARG002
        return True


def test_a_paced_sink_and_its_bound_feed_are_paced() -> None:
    sink = Paced()
    assert paced_sink(sink) is sink
    assert paced_sink(sink.feed) is sink  # a bound method of one: its owner


def test_plain_sinks_are_not() -> None:
    def plain(stream: str, data: bytes) -> None:
        pass

    assert paced_sink(plain) is None
    assert paced_sink(cast(Any, OfferOnly().offer)) is None  # owner not callable
    assert paced_sink(print) is None  # a builtin: __self__ is a module
