"""How a command ended: the one declaration of the exit fields.

A remote command's exit (``exec.exit``), the worker's audit report (``exec.report``), the
coordinator's audit record, the executor's result and the client's result all carry the
same facts; they all take them from ``Outcome`` (by inheritance, so the wire keeps its
flat field names), and the batch jobs' attempts will too.
"""

from __future__ import annotations

import dataclasses
import signal as _signal
from dataclasses import dataclass
from typing import Any

OUTCOME_FIELDS = ("exit_code", "signal", "duration_s", "timed_out", "truncated",
                  "oom_killed", "error", "output_bytes")
ERROR_MAX = 4096  # characters of ``error`` on the wire


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """``exit_code`` is None when a signal (``signal``) ended the command; ``error`` says
    why the command could not run or was cut short; ``truncated`` when its output passed
    the cap; ``output_bytes`` counts what it wrote."""

    exit_code: int | None = None
    signal: int | None = None
    duration_s: float | None = None
    timed_out: bool | None = None
    truncated: bool | None = None
    oom_killed: bool | None = None
    error: str | None = None
    output_bytes: int | None = None

    def outcome(self) -> Outcome:
        """Just the exit facts (drops whatever else a subclass carries)."""
        return Outcome(**{name: getattr(self, name) for name in OUTCOME_FIELDS})

    def outcome_fields(self) -> dict[str, Any]:
        """The exit facts that are set, as wire fields."""
        values = ((name, getattr(self, name)) for name in OUTCOME_FIELDS)
        return {name: value for name, value in values if value is not None}

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.error

    @property
    def returncode(self) -> int:
        """Shell convention: the exit code, 128+N when killed by signal N, 1 otherwise."""
        if self.exit_code is not None:
            return self.exit_code
        if self.signal:
            return 128 + self.signal
        return 1

    def describe(self) -> str:
        """A short human description: ``exit 0``, ``killed by SIGKILL (out of memory)``."""
        if self.oom_killed:
            base = "out of memory"
        elif self.timed_out:
            base = "timed out"
        elif self.exit_code is not None:
            base = f"exit {self.exit_code}"
        elif self.signal:
            try:
                base = f"killed by {_signal.Signals(self.signal).name}"
            except ValueError:
                base = f"killed by signal {self.signal}"
        else:
            base = "no exit status"
        return f"{base}: {self.error}" if self.error else base


def outcome_from(data: dict[str, Any]) -> Outcome:
    """An ``Outcome`` from wire fields (unknown keys ignored)."""
    names = {f.name for f in dataclasses.fields(Outcome)}
    return Outcome(**{k: v for k, v in data.items() if k in names})
