"""What the shell and ``xcloud run`` write: remote output, remarks and exit lines.

:class:`Console` puts remote bytes on the terminal untouched and the client's own
remarks (dim, green, red) beside them; :func:`follow_output` copies a running command's
output there while Ctrl-C (counted by :class:`SigintCounter`) signals the remote command
instead of ending the client.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from client.errors import ClientError
from client.exec_stream import ExecResult, ExecStream, OutputChunk

if TYPE_CHECKING:
    from broker.config import Config
    from client.reservation import ReservedWorker

SIGNAL_NUMBERS = {s.value: s.name.removeprefix("SIG") for s in signal.Signals}


def use_color(config: Config, stream: IO[Any]) -> bool:
    """Colours only on a terminal, never with NO_COLOR, as ClientConfig.color says."""
    if os.environ.get("NO_COLOR"):
        return False
    mode = (config.client.color or "auto").lower()
    if mode in ("always", "yes", "on"):
        return True
    if mode in ("never", "no", "off"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Console:
    """Where the shell writes: raw remote bytes, and its own dim/red/green remarks."""

    def __init__(self, out: IO[str], err: IO[str], color: bool, *,
                 remarks_to_err: bool = False) -> None:
        self.out = out
        self.err = err
        self.color = color
        # Scripted runs keep stdout for data (remote output, tables): remarks such as
        # "reserved ..." and the exit status line go to stderr.
        self.remarks = err if remarks_to_err else out
        self._at_line_start = True

    def _paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def write_chunk(self, chunk: OutputChunk) -> None:
        """Remote bytes go to the terminal as they are (no decoding round trip)."""
        target = self.err if chunk.stream == "stderr" else self.out
        self.out.flush()
        target.flush()  # text written before must come out before these bytes
        buffer = getattr(target, "buffer", None)
        if buffer is not None:
            buffer.write(chunk.data)
            buffer.flush()
        else:
            target.write(chunk.data.decode("utf-8", errors="replace"))
        target.flush()
        if chunk.data:
            self._at_line_start = chunk.data.endswith(b"\n")

    def end_line(self, force: bool = False) -> None:
        """Start a fresh line when the remote output did not end with a newline.

        Only on a terminal session (or ``force``, before more shell output on stdout):
        a scripted run leaves the remote bytes exactly as they were.
        """
        if not self._at_line_start and (force or self.remarks is self.out):
            self.out.write("\n")
            self._at_line_start = True

    def print(self, text: str = "") -> None:
        self.end_line(force=True)
        self.out.write(text + "\n")
        self.out.flush()

    def remark(self, text: str) -> None:
        self.end_line()
        self.out.flush()
        self.remarks.write(text + "\n")
        self.remarks.flush()

    def dim(self, text: str) -> None:
        self.remark(self._paint(text, "2"))

    def ok(self, text: str) -> None:
        self.remark(self._paint(text, "32"))

    def error(self, text: str) -> None:
        self.end_line()
        self.out.flush()
        self.err.write(self._paint(text, "31") + "\n")
        self.err.flush()


def describe_exit(result: ExecResult) -> str:
    """``[exit 0 · 0.12s]``, ``[killed by SIGINT · 3.0s]``, with timeout/truncation notes.

    Not ``Outcome.describe``: the shell's status line lists every fact (an exit code
    *and* "timed out"), where ``describe`` names the one that matters most.
    """
    if result.exit_code is not None:
        what = f"exit {result.exit_code}"
    elif result.signal:
        what = f"killed by SIG{SIGNAL_NUMBERS.get(result.signal, result.signal)}"
    else:
        what = "ended"
    notes = [what, f"{result.duration_s:.2f}s"]
    if result.timed_out:
        notes.append("timed out")
    if result.oom_killed:
        notes.append("out of memory")
    if result.error:
        notes.append(result.error)
    if result.lost_chunks:
        notes.append(f"{result.lost_chunks} output chunk(s) lost")
    return "[" + " · ".join(notes) + "]"


class SigintCounter:
    """Counts Ctrl-C presses while a remote command runs, instead of raising.

    Only the main thread can own SIGINT; elsewhere (tests, embedding) it counts nothing.
    """

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None
        self._installed = False

    def _handler(self, _signum: int, _frame: FrameType | None) -> None:
        self.count += 1

    def __enter__(self) -> SigintCounter:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


# After Ctrl-C, a backlog above this is dropped rather than printed, and so is a chunk
# that would make it so: the output still in flight when the command was signalled (up
# to the worker's send window, in chunks of up to 1 MiB) would otherwise keep the
# terminal busy long after the command ended. Small output (a last message) still shows.
BEHIND_BYTES = 256 * 1024


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"


def follow_output(handle: ReservedWorker, stream: ExecStream, console: Console,
                  *, quiet_interrupts: bool = False) -> ExecResult | None:
    """Copy a running command's output to the console until it ends.

    Ctrl-C: SIGINT to the remote command, again: SIGKILL, a third time: stop following
    (None is returned; the command may still run, see ``ps``). On the first Ctrl-C the
    output received but not yet printed is dropped (with a note), and so is any backlog
    that builds up afterwards: the prompt comes back as soon as the command ends.
    """
    sent = 0
    dropped = 0  # bytes of output not shown because of Ctrl-C
    with SigintCounter() as sigint, stream:
        while True:
            if sent and stream.ready_bytes > BEHIND_BYTES:
                dropped += stream.discard_ready()
            try:
                chunk = stream.next_chunk(timeout=0.1)
            except StopIteration:
                break
            if chunk is not None and sigint.count == sent and (
                    not sent or len(chunk.data) + stream.ready_bytes <= BEHIND_BYTES):
                console.write_chunk(chunk)
            elif chunk is not None:  # a Ctrl-C is pending, or a flood after one
                dropped += len(chunk.data)
            while sigint.count > sent:
                sent += 1
                if sent >= 3:
                    console.dim(f"[detached from {stream.exec_id}; see `ps` and "
                                f"`logs {stream.exec_id}`]")
                    return None
                name = "INT" if sent == 1 else "KILL"
                skipped = stream.discard_ready() if sent == 1 else 0
                dropped += skipped
                try:
                    handle.signal(stream.exec_id, name)
                except ClientError as err:
                    console.error(f"could not signal the command: {err}")
                    continue
                if not quiet_interrupts:
                    hint = " (Ctrl-C again: SIGKILL)" if sent == 1 else " (Ctrl-C again: detach)"
                    note = (f"; {human_size(skipped)} of output received but not shown "
                            "dropped" if skipped else "")
                    console.dim(f"^C: sent SIG{name} to the remote command{hint}{note}")
        if dropped and not quiet_interrupts:
            console.dim(f"[{human_size(dropped)} of output not shown after ^C; "
                        f"`logs {stream.exec_id}` has its end]")
        return stream.result
