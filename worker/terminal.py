"""Pseudo-terminals for remote commands started with a ``tty`` (docs/exec.md, "Terminal").

The process executor runs such a command on a pty of its own: ``os.openpty``, the window
size set on it before the shell starts, the shell a session leader (``start_new_session``)
that opens the slave by its path first thing, which makes the pty its controlling
terminal (no ``preexec_fn``, unsafe in a threaded process). The master is both ends of
the command's I/O for the worker: what the client types (``exec.stdin``) is written to
it, so ^C ^Z ^D reach the line discipline and become signals or EOF there, and its
output (stdout and stderr merged by the pty) is read from it. A resize is a
``TIOCSWINSZ`` on the master: the kernel sends SIGWINCH to the foreground group.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pwd
import shlex
import shutil
import struct
import termios

from worker.executors.base import ExecutorError, PolledInput, TtySize

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
#: After the shell exited, how long its pty may still deliver output: a background
#: process that inherited the terminal would otherwise hold the command open forever.
DRAIN_S = 1.0
#: A command's output on a terminal is sent as it comes (no coalescing delay): an echoed
#: keystroke must not wait for more output (worker/output.py's ``linger_s``).
TTY_LINGER_S = 0.0
#: The shell of a tty exec without a command, inside a container: bash when the image
#: has it, else a POSIX login shell.
CONTAINER_LOGIN_SHELL = ('if command -v bash >/dev/null 2>&1; then bash -l; '
                         'else "${SHELL:-/bin/sh}" -l; fi')


def login_shell() -> str:
    """The worker user's login shell as a command line: ``$SHELL``, else the passwd
    entry's, else /bin/sh; one that refuses logins (nologin, false) gives bash or sh."""
    candidates = [os.environ.get("SHELL", "")]
    with contextlib.suppress(KeyError):
        candidates.append(pwd.getpwuid(os.getuid()).pw_shell)
    for shell in candidates:
        name = os.path.basename(shell or "")
        if shell and name not in ("nologin", "false") and os.access(shell, os.X_OK):
            return f"{shlex.quote(shell)} -l"
    return f"{shlex.quote(shutil.which('bash') or '/bin/sh')} -l"


def tty_prelude(size: TtySize) -> str:
    """Shell text that sizes the command's own terminal (a container engine sets the
    size of an exec's pty only once it runs: a command must not see 0x0 before)."""
    return f"stty rows {int(size.rows)} cols {int(size.cols)} 2>/dev/null; "


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Set the window size of the terminal behind ``fd`` (the foreground group of a
    terminal in use gets SIGWINCH when it changes)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def open_pty(size: TtySize) -> tuple[int, int, str]:
    """A new pty sized ``size``: (master fd, slave fd, slave path); ExecutorError."""
    try:
        master, slave = os.openpty()
    except OSError as err:
        raise ExecutorError(f"cannot open a pseudo-terminal: {err}") from err
    try:
        set_winsize(slave, size.rows, size.cols)
        return master, slave, os.ttyname(slave)
    except OSError as err:
        os.close(master)
        os.close(slave)
        raise ExecutorError(f"cannot set up the pseudo-terminal: {err}") from err


def attach_prelude(path: str) -> str:
    """Shell text that makes the pty at ``path`` the session leader's controlling terminal
    (the first terminal it opens) and its stdin, stdout and stderr."""
    return f"exec 0<>{shlex.quote(path)} 1>&0 2>&0; "


class PtyInput(PolledInput):
    """The master side of a command's pty, for its input and its window size.

    It owns a duplicate of the master (the reader closes its own), so a write or a
    resize after the command ended can never reach a reused descriptor. Ending the
    input does not hang the terminal up: the command sees EOF when ^D is typed.
    """

    def __init__(self, master: int) -> None:
        fd = os.dup(master)
        os.set_blocking(fd, False)  # shared with the reader's, which is non-blocking too
        super().__init__(fd)

    def _send(self, data: bytes | memoryview) -> int:
        return os.write(self._fd, data)

    def _end(self) -> None:
        os.close(self._fd)

    def resize(self, rows: int, cols: int) -> None:
        with self._lock:
            if self._closed:
                raise ExecutorError("the command has ended")
            try:
                set_winsize(self._fd, rows, cols)
            except OSError as err:
                raise ExecutorError(f"cannot resize the terminal: {err}") from err


def read_pty(master: int, size: int = READ_SIZE) -> bytes:
    """One read of a (non-blocking) master: its output, or b"" once every holder of the
    slave is gone (Linux answers EIO then). BlockingIOError when nothing waits; another
    OSError is a failure of its own (the caller ends the reader)."""
    try:
        return os.read(master, size)
    except OSError as err:
        if err.errno == errno.EIO:
            return b""
        raise
