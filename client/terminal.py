"""The local side of a remote terminal: ``xcloud attach``, ``xcloud run -t``, ``term``.

The remote command runs on a pseudo-terminal of the worker (``ReservedWorker.terminal``,
worker/terminal.py); here the local terminal is put in raw mode so that every key,
Ctrl-C / Ctrl-Z / Ctrl-D included, is a byte that goes there (the remote line
discipline turns it into a signal or an EOF), its bytes go out as ``exec.stdin`` as
soon as they are read (one read, one piece: typing latency beats throughput), the
remote output is written raw to stdout, and the window size is sent at start and on
every SIGWINCH. The saved terminal attributes are put back on every way out: the remote
exit, the reservation ending (worker lost), the broker going away, an exception, a
signal. A stdin that is not a terminal is sent as it comes, without raw mode (like
``ssh -tt``); its end is sent as a ^D.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import sys
import termios
import threading
import time
import tty
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from client.errors import ClientError
from client.exec_stream import ExecStream
from client.reservation import ReservedWorker

if TYPE_CHECKING:
    from broker.config import Config

READ_BYTES = 4096
#: How often the output loop looks at a pending resize (SIGWINCH only sets a flag).
POLL_S = 0.05
#: Exit status when the terminal closed without the command's exit (ssh uses 255 too).
LOST = 255
_TERM = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")
EOT = b"\x04"


def window_size(*fds: int) -> tuple[int, int]:
    """(rows, cols) of the first of ``fds`` that is a terminal; else $LINES/$COLUMNS or
    24x80."""
    for fd in fds:
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            if size.lines > 0 and size.columns > 0:
                return size.lines, size.columns
    rows, cols = os.environ.get("LINES", ""), os.environ.get("COLUMNS", "")
    return (int(rows) if rows.isdigit() and int(rows) else 24,
            int(cols) if cols.isdigit() and int(cols) else 80)


def local_term() -> str:
    """$TERM when the wire takes it (a short name), else xterm-256color."""
    name = os.environ.get("TERM", "")
    return name if _TERM.match(name) and name != "dumb" else "xterm-256color"


class RawMode:
    """Raw mode on a terminal fd for a ``with`` block; the saved attributes come back on
    the way out, whatever the way. On a fd that is no terminal it does nothing."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: list[Any] | None = None

    def __enter__(self) -> RawMode:
        if os.isatty(self.fd):
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def restore(self) -> None:
        if self.saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def __exit__(self, *exc: object) -> None:
        self.restore()


class _Keys:
    """Copies local stdin to the remote terminal on a thread of its own, until told to
    stop (a wake pipe ends its select, so a shell that goes on gets its stdin back)."""

    def __init__(self, stream: ExecStream, fd: int, *, eot_at_end: bool) -> None:
        self.stream = stream
        self.fd = fd
        self.eot_at_end = eot_at_end
        self.error: BaseException | None = None
        self._wake_r, self._wake_w = os.pipe()
        self.thread = threading.Thread(target=self._run, name="terminal-keys", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self.thread.join(1.0)
        if not self.thread.is_alive():
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _run(self) -> None:
        sender = self.stream.stdin
        assert sender is not None
        try:
            while not sender.closed:
                ready, _, _ = select.select([self.fd, self._wake_r], [], [])
                if self._wake_r in ready:
                    return
                data = os.read(self.fd, READ_BYTES)
                if not data:
                    if self.eot_at_end:
                        sender.write(EOT)
                    return
                sender.write(data)  # at once: a keystroke must not wait for company
        except (OSError, ClientError, ValueError) as err:
            self.error = err


def run_terminal(handle: ReservedWorker, command: str = "", *, stdin_fd: int | None = None,
                 stdout_fd: int | None = None, stderr: IO[str] | None = None,
                 timeout: float | None = None) -> int:
    """Run ``command`` (empty: the login shell) on a remote terminal driven by the local
    one; returns the remote exit status (255 when the terminal was lost, after saying
    why on stderr)."""
    try:
        in_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
        out_fd = sys.stdout.fileno() if stdout_fd is None else stdout_fd
    except (OSError, ValueError, AttributeError) as error:
        raise ClientError(f"a terminal needs a stdin and a stdout: {error}") from None
    err = stderr if stderr is not None else sys.stderr
    raw = os.isatty(in_fd)
    rows, cols = window_size(out_fd, in_fd)
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    stream = handle.terminal(command, rows=rows, cols=cols, term=local_term(),
                             timeout=timeout)
    keys = _Keys(stream, in_fd, eot_at_end=not raw)
    resized = threading.Event()
    installed, previous = _on_winch(resized)
    reason: str | None = None
    try:
        with RawMode(in_fd), stream:
            keys.start()
            reason = _copy_output(handle, stream, out_fd, resized, (rows, cols), keys)
    except KeyboardInterrupt:  # a SIGINT from outside (raw mode makes ^C a byte)
        reason = "interrupted"
    finally:
        keys.stop()
        if installed:
            signal.signal(signal.SIGWINCH, previous if previous is not None
                          else signal.SIG_DFL)
    if reason is not None:
        err.write(f"\r\nxcloud: terminal closed: {reason}\n")
        err.flush()
        return LOST
    result = stream.result
    if result.error:
        err.write(f"xcloud: {result.error}\n")
    return result.returncode


def _copy_output(handle: ReservedWorker, stream: ExecStream, out_fd: int,
                 resized: threading.Event, size: tuple[int, int], keys: _Keys) -> str | None:
    """Write the remote output to ``out_fd`` until the command exits (None) or the
    terminal is lost (why, in words): the reservation ended, the keys cannot be sent,
    or the broker stayed unreachable for the stream's ``stall_s`` (``[client] stall_s``:
    a terminal that takes no keys is no use; a shorter outage passes unnoticed)."""
    away_since: float | None = None
    while True:
        if keys.error is not None:
            return f"cannot send the keys: {keys.error}"
        if handle.connected:
            away_since = None
        elif away_since is None:
            away_since = time.monotonic()
        elif time.monotonic() - away_since > stream.stall_s:
            return f"the broker has been unreachable for {stream.stall_s:g}s"
        try:
            chunk = stream.next_chunk(timeout=POLL_S)
        except StopIteration:
            return None
        except ClientError as error:  # reservation ended (worker lost), broker gone
            return str(error)
        if chunk is not None:
            try:
                _write_all(out_fd, chunk.data)
            except OSError as error:  # our stdout went away
                return f"cannot write the output: {error.strerror or error}"
        if resized.is_set():
            resized.clear()
            now = window_size(out_fd)
            if now != size:
                size = now
                with contextlib.suppress(ClientError):
                    handle.resize(stream.exec_id, *size)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _on_winch(flag: threading.Event) -> tuple[bool, Any]:
    """SIGWINCH sets ``flag`` (the output loop sends the size): (installed, the previous
    handler); not installed off the main thread (the size is then sent only at start)."""
    if threading.current_thread() is not threading.main_thread():
        return False, None

    def winch(_signum: int, _frame: FrameType | None) -> None:
        flag.set()

    return True, signal.signal(signal.SIGWINCH, winch)


def attach(config: Config, worker: str | None = None, *,
           requirements: dict[str, Any] | None = None, lease_s: float | None = None,
           wait: float | None = None, command: str = "", reserve: bool = False,
           timeout: float | None = None) -> int:
    """``xcloud attach [WORKER]``: a terminal on WORKER. A reservation you hold there (in
    ``xcloud shell`` or a program; no WORKER: the one you hold) is used and kept;
    otherwise the worker (no WORKER: any) is reserved for the terminal alone and released
    when it closes, as ``xcloud run`` does (``reserve``: always, as ``run -t`` does)."""
    from client.api import Grid
    from client.file_copy import _held_on, adopt
    from client.shell import exit_on_hangup

    exit_on_hangup()  # a closed window releases the reservation at once
    with Grid.connect(config) as grid:
        row = None if requirements or reserve else _held_on(grid, worker or "")
        if row is not None:
            handle = adopt(grid, str(row["id"]))
            handle._start_keeper()  # fresh grants while the terminal stays open
            try:
                return run_terminal(handle, command, timeout=timeout)
            finally:
                handle._keeper.stop()
        target: str | int | None = int(worker) if worker and worker.isdigit() else worker
        with grid.reserve(target, any=requirements or None, lease_s=lease_s,
                          wait=wait) as handle:
            return run_terminal(handle, command, timeout=timeout)
