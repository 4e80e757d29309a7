"""The worker's slots as seen by its attempts: a first-come, first-served line.

The coordinator may send a worker more attempts than it has slots (``[jobs] prefetch``,
up to ``[worker] job_queue``: docs/jobs.md, "Prefetch"). Each attempt's thread waits
here before its session is opened, in the order the attempts were accepted, until a slot
is free (slots minus the attempts past the line minus the reservations' slots), and
leaves the line at once when it is killed or the worker stops: such an attempt never ran.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

POLL_S = 0.5  # a waiting attempt looks again this often (reservations end unseen)


class SlotLine:
    """See the module docstring. ``gone(attempt)`` says an attempt should stop waiting."""

    def __init__(self, slots: Callable[[], int], reserved: Callable[[], int]) -> None:
        self._slots = slots
        self._reserved = reserved
        self._cond = threading.Condition(threading.Lock())
        self._line: deque[str] = deque()  # attempts waiting for a slot, oldest first
        self.running = 0  # attempts past the line, until their command has ended

    def take(self, attempt: str, gone: Callable[[], bool]) -> bool:
        """Wait for a slot; False when ``gone()`` became true first."""
        with self._cond:
            self._line.append(attempt)
            try:
                while True:
                    if gone():
                        return False
                    if self._line[0] == attempt and (
                            self.running + self._reserved() < max(1, self._slots())):
                        self.running += 1
                        return True
                    self._cond.wait(POLL_S)
            finally:
                self._line.remove(attempt)
                self._cond.notify_all()

    def free(self) -> None:
        """An attempt's command has ended: the next in line may start."""
        with self._cond:
            self.running -= 1
            self._cond.notify_all()

    def wake(self) -> None:
        """Something a waiter checks changed (a kill, the worker stopping)."""
        with self._cond:
            self._cond.notify_all()
