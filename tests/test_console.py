"""The shell's terminal side without a grid: Ctrl-C during heavy output (issue 8, item 18).

Output arrives faster than a terminal prints it, so it piles up in the stream. Ctrl-C
signals the remote command; what was received but not printed yet is dropped (with a
note), instead of keeping the terminal busy for up to a minute after the command died.
"""

from __future__ import annotations

import io
import signal
import threading
from typing import TYPE_CHECKING

import pytest

from client.console import Console, follow_output
from client.exec_stream import ExecStream

if TYPE_CHECKING:
    from typing_extensions import Buffer

CHUNK = b"y\n" * 500  # 1,000 bytes
BACKLOG = 100


class SlowTerminal(io.BytesIO):
    """A terminal that the user interrupts (Ctrl-C) while it prints the first chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def write(self, data: Buffer, /) -> int:
        written = super().write(data)
        if not self.interrupted:
            self.interrupted = True
            signal.raise_signal(signal.SIGINT)
        return written


class DyingCommand:
    """The handle of a command that dies of SIGINT, printing one last line."""

    def __init__(self, stream: ExecStream) -> None:
        self.stream = stream
        self.signals: list[str] = []

    def signal(self, exec_id: str, name: str) -> None:
        assert exec_id == self.stream.exec_id
        self.signals.append(name)
        self.stream.feed(BACKLOG, "stdout", b"bye\n")
        self.stream.feed_exit({"last_seq": BACKLOG, "exit_code": None, "signal": 2,
                               "duration_s": 1.0})


def test_ctrl_c_drops_the_output_not_yet_printed() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.fail("SIGINT can only be counted on the main thread")
    stream = ExecStream("e1", keep_output=False, buffer_chunks=True)
    for seq in range(BACKLOG):  # received, waiting for the terminal
        stream.feed(seq, "stdout", CHUNK)
    terminal = SlowTerminal()
    out = io.TextIOWrapper(terminal, write_through=True)
    remarks = io.StringIO()
    handle = DyingCommand(stream)
    console = Console(out, remarks, color=False, remarks_to_err=True)
    result = follow_output(handle, stream, console)  # type: ignore[arg-type]
    assert handle.signals == ["INT"]
    assert result is not None
    assert result.signal == 2
    assert terminal.getvalue() == CHUNK + b"bye\n"  # the backlog was never printed
    notes = remarks.getvalue()
    assert "^C: sent SIGINT to the remote command" in notes
    assert "96.7 KiB of output received but not shown dropped" in notes
    assert stream.ready_bytes == 0


def test_discard_ready_counts_bytes() -> None:
    stream = ExecStream("e2", keep_output=True, buffer_chunks=True)
    stream.feed(0, "stdout", b"abc")
    stream.feed(2, "stdout", b"zz")  # out of order: pending, not ready
    assert stream.ready_bytes == 3
    assert stream.discard_ready() == 3
    stream.feed(1, "stderr", b"de")
    assert stream.ready_bytes == 4  # seq 1 and the pending seq 2
    chunk = stream.next_chunk(timeout=0)
    assert chunk is not None
    assert chunk.data == b"de"
    assert stream.ready_bytes == 2
