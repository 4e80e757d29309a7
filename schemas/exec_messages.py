"""Typed views of the stdin and terminal messages of remote commands (``exec.stdin``,
``exec.resize``; docs/exec.md).

Registered in ``schemas.messages.REGISTRY`` like every other message type
(schemas/messages.py imports this module at its end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from schemas.messages import Body, message

#: Raw bytes one ``exec.stdin`` carries at most (base64 makes 1,398,104 characters of it):
#: the cost of input is per piece, so pieces are large (docs/exec.md, "Measured").
STDIN_CHUNK_BYTES = 1024 * 1024
#: Pieces a client may have sent and not yet seen acknowledged.
STDIN_WINDOW = 4


@message
@dataclass(frozen=True, kw_only=True)
class ExecStdin(Body):
    """The next piece of a command's stdin: ``data`` is base64; ``eof`` closes it after."""

    TYPE: ClassVar[str] = "exec.stdin"
    grant: str
    exec_id: str
    seq: int
    data: str
    eof: bool | None = None


@message
@dataclass(frozen=True, kw_only=True)
class ExecResize(Body):
    """The client's terminal changed size: set it on the command's pty (SIGWINCH there)."""

    TYPE: ClassVar[str] = "exec.resize"
    grant: str
    exec_id: str
    rows: int
    cols: int


@message
@dataclass(frozen=True, kw_only=True)
class ExecStdinAck(Body):
    """Every piece up to ``acked`` is written to the command; ``closed``: send no more."""

    TYPE: ClassVar[str] = "exec.stdin.ack"
    exec_id: str
    acked: int
    closed: bool
