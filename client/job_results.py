"""How a job ended (``JobResult``) and what names one of its outputs before it has run
(``JobOutputRef``, for futures as inputs: docs/jobs.md, "Futures as inputs").

Moved out of ``client/jobs.py``, which re-exports both.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.data import DataRef
from client.errors import ClientError
from schemas.job_messages import JobsShowReply

if TYPE_CHECKING:
    from client.api import Grid

STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class JobOutputRef:
    """An output of a job that may not have run yet: ``output`` is the name of one of
    its output files, or ``stdout``/``stderr``. Given as a job's input, it makes that job
    wait for ``job`` and receive the file under the input's name; the grid resolves it
    when the child is scheduled, so nothing waits here. ``future.output(name)`` makes
    one; a plain job id works too (``JobOutputRef("j-...", "out.txt")``)."""

    job: str
    output: str = "stdout"

    def __post_init__(self) -> None:
        if not self.output or self.output.startswith("/") or ".." in Path(self.output).parts:
            raise ValueError(f"not an output name: {self.output!r}")


@dataclass(frozen=True)
class JobResult:
    """How a job ended: its state, exit facts, and its results as data refs. ``stdout``
    and ``stderr`` are fetched from the coordinator on first use."""

    job: str
    state: str
    exit_code: int | None = None
    signal: int | None = None
    stdout_ref: DataRef | None = None
    stderr_ref: DataRef | None = None
    outputs: tuple[DataRef, ...] = ()  # each named as the job's output file
    error: str | None = None
    grid: Grid | None = field(default=None, repr=False, compare=False)
    _cache: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.state == "completed" and self.exit_code == 0

    @property
    def stdout(self) -> bytes:
        return self._bytes("stdout", self.stdout_ref)

    @property
    def stderr(self) -> bytes:
        return self._bytes("stderr", self.stderr_ref)

    def output(self, name: str) -> bytes:
        for ref in self.outputs:
            if ref.name == name:
                return self._bytes(f"out:{name}", ref)
        raise KeyError(name)

    def _bytes(self, key: str, ref: DataRef | None) -> bytes:
        if ref is None:
            return b""
        if key not in self._cache:
            if self.grid is None:
                raise ClientError("this result is not attached to a grid")
            with tempfile.TemporaryDirectory(prefix="xcloud-result-") as tmp:
                path = self.grid.data.get(ref.sha256, Path(tmp) / "blob")
                self._cache[key] = path.read_bytes()
        return self._cache[key]

    def save(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write stdout, stderr and the outputs (under their names) into ``directory``."""
        if self.grid is None:
            raise ClientError("this result is not attached to a grid")
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for name, ref in (("stdout", self.stdout_ref), ("stderr", self.stderr_ref)):
            dest = root / name
            if ref is None:
                dest.write_bytes(b"")
            else:
                self.grid.data.get(ref.sha256, dest)
            written.append(dest)
        for ref in self.outputs:
            rel = Path(ref.name)
            if rel.is_absolute() or ".." in rel.parts:
                continue  # never write outside the directory
            dest = root / "outputs" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.grid.data.get(ref.sha256, dest)
            written.append(dest)
        return written

    @classmethod
    def from_show(cls, reply: JobsShowReply, grid: Grid | None) -> JobResult:
        job = reply.job
        results = job.get("results") or {}

        def ref(item: Any, name: str) -> DataRef | None:
            if not item:
                return None
            return DataRef(sha256=str(item["sha256"]), size=int(item["size"]), name=name)

        errors = [a.get("error") for a in reply.attempts if a.get("error")]
        return cls(job=str(job["id"]), state=str(job["state"]),
                   exit_code=results.get("exit_code", job.get("exit_code")),
                   signal=results.get("signal"),
                   stdout_ref=ref(results.get("stdout"), "stdout"),
                   stderr_ref=ref(results.get("stderr"), "stderr"),
                   outputs=tuple(r for r in (ref(o, str(o["name"]))
                                             for o in results.get("outputs") or []) if r),
                   error=job.get("hold_reason") or (str(errors[-1]) if errors else None),
                   grid=grid)
