"""``xcloud shell``: the interactive client, with xCloud's command names.

    xcloud> listWorkers
    xcloud> reserveWorker 0
    xcloud (vm-w1)> myWorker
    xcloud (vm-w1)> output ls -al

Everything after ``output``/``start`` is handed to the worker's ``/bin/sh -c`` untouched
(pipes, quotes, redirections). Output streams live; Ctrl-C sends SIGINT to the remote
command (again: SIGKILL; a third time detaches) and the shell stays. The same commands
run scripted: ``xcloud shell -c "reserve any" "output uname -a; uptime"`` (one command
per argument or per line; ``;`` belongs to the remote command) or from a pipe; the exit
status is then the last remote command's (1 on an error).

No error ends an interactive session: whatever a command raises is reported and the
prompt comes back, with the reservation, its background commands and its work directory
intact. Log lines (warnings) are printed above the prompt, never over it.

This module holds the front ends: the prompt_toolkit session (completion, persistent
history, a bottom toolbar with connection, reserved worker and lease), the scripted
runner, and ``xcloud run`` (:func:`run_once`). The parts live beside it: the command
table and parsing in :mod:`client.shell_syntax`, terminal output in
:mod:`client.console`, the commands themselves in :mod:`client.shell_commands`
(:class:`Shell`, which knows nothing of prompt_toolkit, so scripted runs need no
terminal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from client.console import (
    SIGNAL_NUMBERS,
    Console,
    SigintCounter,
    describe_exit,
    follow_output,
    use_color,
)
from client.reservation import SIGNALS
from client.shell_commands import Shell
from client.shell_syntax import (
    COMMANDS,
    CommandSpec,
    ShellError,
    ShellExit,
    command_names,
    find_command,
    parse_bytes,
    reserve_args,
    script_commands,
    split_script,
)
from client.validation import check_command
from schemas.errors import XcloudError

if TYPE_CHECKING:
    from prompt_toolkit.completion import CompleteEvent, Completion
    from prompt_toolkit.document import Document

    from broker.config import Config

__all__ = [
    "COMMANDS",
    "SIGNAL_NUMBERS",
    "CommandSpec",
    "Console",
    "Shell",
    "ShellError",
    "ShellExit",
    "SigintCounter",
    "command_names",
    "describe_exit",
    "exit_on_hangup",
    "follow_output",
    "history_path",
    "parse_bytes",
    "reserve_args",
    "run_interactive",
    "run_once",
    "run_script",
    "run_shell",
    "script_commands",
    "split_script",
    "use_color",
]

log = logging.getLogger(__name__)


def run_script(shell: Shell, commands: Iterable[str]) -> int:
    """Scripted mode: stop at the first error (1); else the last remote exit status."""
    try:
        for command in commands:
            shell.execute(command)
    except ShellExit:
        pass
    except XcloudError as err:
        shell.console.error(f"xcloud: error: {err}")
        return 1
    except KeyboardInterrupt:
        return 130
    return shell.last_status or 0


def run_line(shell: Shell, line: str) -> bool:
    """Run one typed line; False when the shell should end (``exit``).

    Nothing a command raises ends the session: errors are reported in one line and the
    prompt comes back (an unexpected one is a bug, reported as such, traceback at -vv).
    """
    try:
        shell.execute(line)  # typed lines are not split: `;` belongs to the remote shell
    except ShellExit:
        return False
    except XcloudError as err:
        shell.console.error(f"error: {err}")
    except KeyboardInterrupt:
        shell.console.error("interrupted")
    except Exception as err:  # a bug must not throw the session (and its worker) away
        log.debug("command %r failed", line, exc_info=True)
        shell.console.error(f"internal error (a bug; the session goes on): "
                            f"{type(err).__name__}: {err}")
    return True


def _stdin_lines(stream: IO[str]) -> Iterator[str]:
    for line in stream:
        yield line.rstrip("\n")


def history_path(config: Config) -> Path:
    path = Path(config.client.history_file).expanduser() if config.client.history_file \
        else config.home / "shell_history"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _completer(shell: Shell) -> Any:
    from prompt_toolkit.completion import Completer, Completion

    class ShellCompleter(Completer):
        """Command names first; then worker ids/names/indexes, exec ids, signals."""

        def get_completions(self, document: Document,
                            complete_event: CompleteEvent,  # noqa: ARG002 - prompt_toolkit's
                            ) -> Iterator[Completion]:
            text = document.text_before_cursor
            words = text.split()
            if not words or (len(words) == 1 and not text.endswith(" ")):
                prefix = words[0] if words else ""
                for name in command_names():
                    if name.lower().startswith(prefix.lower()):
                        yield Completion(name, -len(prefix))
                return
            spec = find_command(words[0])
            if spec is None or spec.name in ("output", "start"):
                return
            prefix = "" if text.endswith(" ") else words[-1]
            position = len(words) - (0 if text.endswith(" ") else 1)
            candidates: list[str] = []
            if spec.name == "reserveWorker":
                candidates = ["any", "--tag", "--min-cpus", "--min-memory", "--os", "--arch",
                              "--executor", "--image", "--lease"]
                for pos, w in enumerate(shell.listing):
                    candidates += [str(w.index if w.index >= 0 else pos), w.id, w.name]
            elif spec.name == "job" and position == 1:
                candidates = ["show"]
            elif spec.name in ("job", "wait", "results", "cancel", "hold", "release"):
                candidates = list(reversed(shell.job_ids))  # batch jobs submitted here
                candidates += ["--reason"] if spec.name == "hold" else []
            elif spec.name == "logs" and position == 1:
                candidates = list(reversed(shell.execs)) + list(reversed(shell.job_ids))
            elif spec.name in ("logs", "kill") and position == 1:
                candidates = list(reversed(shell.execs))
            elif spec.name == "kill" and position == 2:
                candidates = list(SIGNALS)
            elif spec.name == "logs":
                candidates = ["-f"]
            elif spec.name == "help":
                candidates = command_names()
            seen: set[str] = set()
            for cand in candidates:
                if cand not in seen and cand.startswith(prefix):
                    seen.add(cand)
                    yield Completion(cand, -len(prefix))

    return ShellCompleter()


@contextlib.contextmanager
def logs_above_the_prompt() -> Iterator[None]:
    """Log lines go above the prompt instead of through it.

    ``patch_stdout`` makes ``sys.stdout``/``sys.stderr`` print above the prompt while it
    is shown; logging's handlers hold the streams they were made with, so they are
    pointed at the patched stderr for the session, with a short format. Warnings are
    shown (a one-shot command shows them only with -v).
    """
    from prompt_toolkit.patch_stdout import patch_stdout

    root = logging.getLogger()
    with patch_stdout(raw=True):
        handlers = [h for h in root.handlers
                    if isinstance(h, logging.StreamHandler) and not isinstance(
                        h, logging.FileHandler)]
        saved = [(h, h.setStream(sys.stderr), h.formatter) for h in handlers]
        short = logging.Formatter("%(levelname)s %(name)s: %(message)s")
        for h in handlers:
            h.setFormatter(short)
        level = root.level
        if level > logging.WARNING:
            root.setLevel(logging.WARNING)
        try:
            yield
        finally:
            root.setLevel(level)
            for handler, stream, formatter in saved:
                if stream is not None:
                    handler.setStream(stream)
                handler.setFormatter(formatter)


def run_interactive(shell: Shell, config: Config) -> int:
    """The prompt_toolkit front end."""
    with logs_above_the_prompt():
        return _prompt_loop(shell, config)


def _prompt_loop(shell: Shell, config: Config) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.output.color_depth import ColorDepth
    from prompt_toolkit.styles import Style

    session: PromptSession[str] = PromptSession(
        history=FileHistory(str(history_path(config))),
        completer=_completer(shell),
        bottom_toolbar=shell.toolbar,
        refresh_interval=1.0,
        complete_while_typing=True,
        style=Style.from_dict({"bottom-toolbar": "noreverse bg:#303030 #d0d0d0"}),
        color_depth=None if shell.console.color else ColorDepth.DEPTH_1_BIT,
    )

    def wake() -> None:
        app = session.app
        if app.is_running:
            app.invalidate()

    shell.on_notice = wake
    shell.console.print("xcloud shell: `help` lists the commands; Ctrl-D or `exit` leaves.")
    while True:
        for notice in shell.take_notices():
            shell.console.error(notice)
        try:
            line = session.prompt(shell.prompt_text)
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
        if not run_line(shell, line):
            break
    return shell.last_status or 0


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the exit flush cannot fail."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def exit_on_hangup() -> None:
    """SIGHUP (terminal closed) and SIGTERM leave through the normal exit path, so the
    reservation is released at once instead of after the coordinator's grace period."""
    if threading.current_thread() is not threading.main_thread():
        return

    def leave(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, leave)


def run_shell(config: Config, script: str | list[str] | None = None,
              stdin: IO[str] | None = None) -> int:
    """``xcloud shell``: interactive on a terminal, scripted with ``-c`` or a pipe.

    ``script``: the ``-c`` arguments, each one command or several lines of them.
    """
    from client.api import Grid

    stdin = stdin or sys.stdin
    if isinstance(script, str):
        script = [script]
    scripted = script is not None or not stdin.isatty()
    console = Console(sys.stdout, sys.stderr, use_color(config, sys.stdout),
                      remarks_to_err=scripted)
    exit_on_hangup()
    with Grid.connect(config) as grid:
        shell = Shell(grid, console)
        try:
            if script is not None:
                return run_script(shell, script_commands(script))
        except ShellError as err:  # e.g. an unterminated quote
            console.error(f"xcloud: error: {err}")
            return 2
        except BrokenPipeError:
            _silence_stdout()
            return 128 + signal.SIGPIPE
        try:
            if not stdin.isatty():
                return run_script(shell, _stdin_lines(stdin))  # one command per line
        except BrokenPipeError:
            _silence_stdout()
            return 128 + signal.SIGPIPE
        return run_interactive(shell, config)


def run_once(config: Config, command: str, *, worker: str | None = None,
             requirements: dict[str, Any] | None = None, timeout: float | None = None,
             lease_s: float | None = None, wait: float | None = None,
             stdin_fd: int | None = None) -> int:
    """``xcloud run``: reserve, run with live output, release; the remote exit status.

    ``stdin_fd``: a file descriptor whose bytes flow to the command's stdin until its end
    (``echo hi | xcloud run -- cat``, as with ssh); None: the command reads EOF."""
    from client.api import Grid

    console = Console(sys.stdout, sys.stderr, use_color(config, sys.stderr),
                      remarks_to_err=True)
    check_command(command)  # before a worker is reserved for nothing
    target: str | int | None = int(worker) if worker and worker.isdigit() else worker
    started = time.monotonic()
    exit_on_hangup()
    with Grid.connect(config) as grid, \
            grid.reserve(target, any=requirements or None, lease_s=lease_s,
                         wait=wait) as handle:
        log.info("reserved %s in %.2fs", handle.worker, time.monotonic() - started)
        stream = handle.stream(command, timeout=timeout, stdin=stdin_fd is not None)
        if stdin_fd is not None:
            from client.exec_stream import feed_in_background

            assert stream.stdin is not None
            feed_in_background(stream.stdin, stdin_fd, "stdin-pump")
        try:
            result = follow_output(handle, stream, console)
        except BrokenPipeError:
            # Our reader went away (`xcloud run ... | head`): like a local pipeline, the
            # command stops (closing the stream sent it TERM) and we exit as by SIGPIPE.
            _silence_stdout()
            return 128 + signal.SIGPIPE
        if result is None:
            return 130
        if result.truncated:  # stdout stays exactly the command's output
            console.error("xcloud: output truncated")
        if result.timed_out:
            console.error(f"xcloud: timed out after {timeout:g}s" if timeout
                          else "xcloud: timed out")
        if result.error:
            console.error(f"xcloud: {result.error}")
        return result.returncode
