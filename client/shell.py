"""``xcloud shell``: the interactive client, with xCloud's command names.

    xcloud> listWorkers
    xcloud> reserveWorker 0
    xcloud (vm-w1)> myWorker
    xcloud (vm-w1)> output ls -al

Everything after ``output``/``start`` is handed to the worker's ``/bin/sh -c`` untouched
(pipes, quotes, redirections). Output streams live; Ctrl-C sends SIGINT to the remote
command (again: SIGKILL; a third time detaches) and the shell stays. The same commands
run scripted: ``xcloud shell -c "reserve any; output uname -a"`` or from a pipe; the exit
status is then the last remote command's (1 on an error).

The interactive front end is prompt_toolkit (completion, persistent history, a bottom
toolbar with connection, reserved worker and lease); the command logic in :class:`Shell`
knows nothing about it, so scripted runs need no terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from client.errors import ClientError
from client.exec_stream import ExecResult, ExecStream, OutputChunk
from client.reservation import SIGNALS, ReservedWorker
from client.table import ago, render, workers_table

if TYPE_CHECKING:
    from prompt_toolkit.completion import CompleteEvent, Completion
    from prompt_toolkit.document import Document

    from broker.config import Config
    from client.api import Grid, WorkerInfo

log = logging.getLogger(__name__)

SIGNAL_NUMBERS = {s.value: s.name.removeprefix("SIG") for s in signal.Signals}


class ShellError(ClientError):
    """Bad usage of a shell command."""


class ShellExit(Exception):
    """``exit`` / ``quit``."""


@dataclass(frozen=True)
class CommandSpec:
    name: str
    aliases: tuple[str, ...]
    usage: str
    help: str


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("listWorkers", ("workers", "ls"), "listWorkers",
                "list the grid's workers; # is the index reserveWorker takes"),
    CommandSpec("reserveWorker", ("reserve",),
                "reserveWorker N|ID|NAME|any [--tag T] [--min-cpus N] [--min-memory B] "
                "[--os OS] [--arch ARCH] [--executor E] [--image I] [--lease S]",
                "reserve a worker: index N of the listing, an id or name, or any match"),
    CommandSpec("myWorker", ("mine",), "myWorker", "show the worker you hold"),
    CommandSpec("output", ("run",), "output CMD",
                "run CMD on your worker and show its output live (Ctrl-C interrupts it)"),
    CommandSpec("start", ("bg",), "start CMD", "run CMD in the background; prints its id"),
    CommandSpec("ps", (), "ps", "commands started on your worker"),
    CommandSpec("logs", (), "logs ID [-f]", "output kept for a command; -f follows it"),
    CommandSpec("kill", (), "kill ID [SIGNAL]", "signal a command (default TERM)"),
    CommandSpec("release", ("releaseWorker",), "release", "give your worker back"),
    CommandSpec("help", ("?",), "help [COMMAND]", "this list, or one command's usage"),
    CommandSpec("exit", ("quit",), "exit", "leave (releases your worker)"),
)
_BY_NAME: dict[str, CommandSpec] = {}
for _spec in COMMANDS:
    for _n in (_spec.name, *_spec.aliases):
        _BY_NAME[_n.lower()] = _spec


def command_names() -> list[str]:
    return [n for spec in COMMANDS for n in (spec.name, *spec.aliases)]


# -- parsing ---------------------------------------------------------------------------


def split_script(text: str) -> list[str]:
    """Split a script on ``;`` and newlines outside quotes; backslash escapes a char.

    Only the top level splits: ``output sh -c 'a; b'`` stays one command. Quotes and
    backslashes are kept as typed, since the remote shell parses them again.
    """
    parts: list[str] = []
    buf: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quote != "'" and i + 1 < len(text):
            buf.append(text[i:i + 2])
            i += 2
            continue
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in ";\n":
            parts.append("".join(buf))
            buf = []
            i += 1
            continue
        buf.append(ch)
        i += 1
    if quote:
        raise ShellError(f"unterminated {quote} quote")
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip() and not p.strip().startswith("#")]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``4G``, ``512MiB``, ``1000000`` -> bytes (K/M/G/T are binary multiples)."""
    m = _SIZE.match(text)
    if not m:
        raise ShellError(f"not a size: {text!r} (e.g. 512M, 4G)")
    factor = 1024 ** " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * factor)


def reserve_args(words: list[str]) -> tuple[str | int | None, dict[str, Any], dict[str, Any]]:
    """``reserveWorker`` arguments -> (target, any-requirements, extra reserve kwargs)."""
    target: str | int | None = None
    req: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    it = iter(words)
    for word in it:
        if word.startswith("--"):
            key, eq, value = word[2:].partition("=")
            if not eq:
                try:
                    value = next(it)
                except StopIteration:
                    raise ShellError(f"--{key} needs a value") from None
            try:
                if key == "tag" or key == "tags":
                    req.setdefault("tags", []).extend(t for t in value.split(",") if t)
                elif key == "min-cpus":
                    req["min_cpus"] = int(value)
                elif key == "min-memory":
                    req["min_memory_bytes"] = parse_bytes(value)
                elif key in ("os", "arch", "executor"):
                    req[key] = value
                elif key == "image":
                    extra["image"] = value
                elif key == "lease":
                    extra["lease_s"] = float(value)
                else:
                    raise ShellError(f"unknown option --{key}")
            except ValueError:
                raise ShellError(f"bad value for --{key}: {value!r}") from None
        elif target is None:
            target = int(word) if word.isdigit() else word
        else:
            raise ShellError(f"unexpected argument {word!r}")
    if target == "any":
        target = None
    if req and target is not None:
        raise ShellError("give either a worker or requirements (--tag, --min-cpus, ...)")
    return target, req, extra


# -- terminal output --------------------------------------------------------------------


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
    """``[exit 0 · 0.12s]``, ``[killed by SIGINT · 3.0s]``, with timeout/truncation notes."""
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

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1

    def __enter__(self) -> SigintCounter:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


def follow_output(handle: ReservedWorker, stream: ExecStream, console: Console,
                  *, quiet_interrupts: bool = False) -> ExecResult | None:
    """Copy a running command's output to the console until it ends.

    Ctrl-C: SIGINT to the remote command, again: SIGKILL, a third time: stop following
    (None is returned; the command may still run, see ``ps``).
    """
    sent = 0
    with SigintCounter() as sigint, stream:
        while True:
            try:
                chunk = stream.next_chunk(timeout=0.1)
            except StopIteration:
                break
            if chunk is not None:
                console.write_chunk(chunk)
            while sigint.count > sent:
                sent += 1
                if sent >= 3:
                    console.dim(f"[detached from {stream.exec_id}; see `ps` and "
                                f"`logs {stream.exec_id}`]")
                    return None
                name = "INT" if sent == 1 else "KILL"
                try:
                    handle.signal(stream.exec_id, name)
                except ClientError as err:
                    console.error(f"could not signal the command: {err}")
                    continue
                if not quiet_interrupts:
                    hint = " (Ctrl-C again: SIGKILL)" if sent == 1 else " (Ctrl-C again: detach)"
                    console.dim(f"^C: sent SIG{name} to the remote command{hint}")
        return stream.result


# -- the command interpreter -----------------------------------------------------------


class Shell:
    """The shell's commands, independent of how lines arrive (prompt, -c, pipe)."""

    def __init__(self, grid: Grid, console: Console) -> None:
        self.grid = grid
        self.console = console
        self.reserved: ReservedWorker | None = None
        self.listing: list[WorkerInfo] = []
        self.execs: list[str] = []
        self.last_status: int | None = None
        self.notices: list[str] = []
        self._notice_lock = threading.Lock()
        self.on_notice: Callable[[], None] | None = None

    # -- state for the toolbar and completion -----------------------------------------

    def take_notices(self) -> list[str]:
        with self._notice_lock:
            notices, self.notices = self.notices, []
        return notices

    def _notify(self, text: str) -> None:
        with self._notice_lock:
            self.notices.append(text)
        if self.on_notice is not None:
            self.on_notice()

    def prompt_text(self) -> str:
        if self.reserved is not None and not self.reserved.ended:
            return f"xcloud ({self.reserved.worker_name})> "
        return "xcloud> "

    def toolbar(self) -> str:
        bus = self.grid.bus
        conn = (f"connected {bus.config.url} as {self.grid.principal}" if self.grid.connected
                else f"disconnected from {bus.config.url}, reconnecting…")
        if self.reserved is not None and not self.reserved.ended:
            res = (f"worker {self.reserved.worker_name} ({self.reserved.id}) · lease "
                   f"{self.reserved.time_left():.0f}s left")
        elif self.reserved is not None:
            res = f"reservation ended: {self.reserved.ended_reason}"
        else:
            res = "no worker reserved"
        return f" {conn} │ {res} "

    # -- dispatch ------------------------------------------------------------------------

    def execute(self, line: str) -> None:
        """Run one command line; raises ClientError (or ShellExit) for the caller."""
        line = line.strip()
        if not line or line.startswith("#"):
            return
        verb, _, rest = line.partition(" ")
        if not verb:
            return
        spec = _BY_NAME.get(verb.lower())
        if spec is None:
            raise ShellError(f"unknown command {verb!r}; type `help` for the list")
        getattr(self, f"cmd_{spec.name.lower()}")(rest.strip())

    def _words(self, rest: str) -> list[str]:
        try:
            return shlex.split(rest)
        except ValueError as err:
            raise ShellError(str(err)) from None

    def _holding(self) -> ReservedWorker:
        if self.reserved is None:
            raise ShellError("no worker reserved: use `reserveWorker N` (see `listWorkers`)")
        if self.reserved.ended:
            reason = self.reserved.ended_reason
            self.reserved = None
            raise ShellError(f"your reservation ended ({reason}); reserve a worker again")
        return self.reserved

    # -- commands ------------------------------------------------------------------------

    def cmd_help(self, rest: str) -> None:
        words = self._words(rest)
        if words:
            spec = _BY_NAME.get(words[0].lower())
            if spec is None:
                raise ShellError(f"unknown command {words[0]!r}")
            aliases = f" (also: {', '.join(spec.aliases)})" if spec.aliases else ""
            self.console.print(f"{spec.usage}{aliases}\n  {spec.help}")
            return
        rows = [[spec.usage.split(" [--")[0], ", ".join(spec.aliases), spec.help]
                for spec in COMMANDS]
        self.console.print(render(["COMMAND", "ALIASES", "WHAT"], rows))

    def cmd_exit(self, rest: str) -> None:
        raise ShellExit

    def cmd_listworkers(self, rest: str) -> None:
        self.listing = self.grid.workers()
        table = workers_table(self.listing)
        if self.reserved is not None and not self.reserved.ended:
            table += f"\n(you hold {self.reserved.worker_name})"
        self.console.print(table)

    def _resolve(self, target: str | int | None) -> str | int | None:
        if isinstance(target, int) and self.listing:
            for pos, row in enumerate(self.listing):
                if (row.index if row.index >= 0 else pos) == target:
                    return row.id
            raise ShellError(f"no worker #{target} in the last listing "
                             f"(0..{len(self.listing) - 1}); `listWorkers` to refresh")
        return target  # the API resolves an index against a fresh listing

    def cmd_reserveworker(self, rest: str) -> None:
        if self.reserved is not None and not self.reserved.ended:
            raise ShellError(f"you already hold {self.reserved.worker_name} (reservation "
                             f"{self.reserved.id}); `release` it first")
        target, req, extra = reserve_args(self._words(rest))
        handle = self.grid.reserve(self._resolve(target), any=req or None, **extra)
        self.reserved = handle
        handle.on_ended(self._ended)
        self.console.ok(f"reserved {handle.worker_name} ({handle.worker}), reservation "
                        f"{handle.id}, lease {handle.lease_s:.0f}s (renewed while connected)")

    def _ended(self, handle: ReservedWorker) -> None:
        if handle.ended_reason != "released":
            self._notify(f"your reservation {handle.id} on {handle.worker_name} ended: "
                         f"{handle.ended_reason}")

    def cmd_myworker(self, rest: str) -> None:
        from client.table import worker_detail

        if self.reserved is None or self.reserved.ended:
            others = [r for r in self.grid.reservations()
                      if r.get("state") in (None, "active")]
            if others:
                lines = [f"no worker reserved in this shell; {self.grid.principal} holds "
                         f"{r.get('worker_name') or r['worker']} (reservation {r['id']}, "
                         f"another session)" for r in others]
                self.console.print("\n".join(lines))
                return
            raise ShellError("no worker reserved: use `reserveWorker N` (see `listWorkers`)")
        h = self.reserved
        self.console.print(f"reservation {h.id}: {h.worker_name} ({h.worker}), lease "
                           f"{h.lease_s:.0f}s, expires in {h.time_left():.0f}s unless renewed")
        try:
            self.console.print(worker_detail(self.grid.worker(h.worker)))
        except ClientError as err:
            self.console.error(f"(no details: {err})")

    def cmd_output(self, rest: str) -> None:
        if not rest:
            raise ShellError("usage: output CMD")
        handle = self._holding()
        stream = handle.stream(rest)
        self.execs.append(stream.exec_id)
        result = follow_output(handle, stream, self.console)
        if result is None:
            return
        self.last_status = result.returncode
        self.console.end_line()
        if result.truncated:
            self.console.dim("[output truncated]")
        self.console.dim(describe_exit(result))

    def cmd_start(self, rest: str) -> None:
        if not rest:
            raise ShellError("usage: start CMD")
        exec_id = self._holding().start(rest)
        self.execs.append(exec_id)
        self.console.print(f"started {exec_id} (see `ps`, `logs {exec_id}`, `kill {exec_id}`)")

    def cmd_ps(self, rest: str) -> None:
        rows = self._holding().ps()
        if not rows:
            self.console.print("no commands yet")
            return
        for row in rows:
            if row.exec_id not in self.execs:
                self.execs.append(row.exec_id)
        self.console.print(render(
            ["ID", "STATE", "MODE", "PID", "EXIT", "TIME", "STARTED", "COMMAND"],
            [[r.exec_id, r.state, r.mode or "-", "-" if r.pid is None else str(r.pid),
              "-" if r.exit_code is None else str(r.exit_code),
              "-" if r.duration_s is None else f"{r.duration_s:.1f}s",
              ago(r.started_at), r.command if len(r.command) <= 60 else r.command[:59] + "…"]
             for r in rows]))

    def _exec_id(self, word: str) -> str:
        if word in self.execs:
            return word
        matches = [e for e in self.execs if e.startswith(word)]
        return matches[0] if len(matches) == 1 else word

    def cmd_logs(self, rest: str) -> None:
        words = self._words(rest)
        follow = any(w in ("-f", "--follow") for w in words)
        ids = [w for w in words if w not in ("-f", "--follow")]
        if len(ids) != 1:
            raise ShellError("usage: logs ID [-f]")
        handle = self._holding()
        chunks = handle.logs(self._exec_id(ids[0]), follow=follow)
        if isinstance(chunks, ExecStream):
            result = self._follow_logs(chunks)
            if result is not None:
                self.console.dim(describe_exit(result))
            return
        for chunk in chunks:
            self.console.write_chunk(chunk)
        self.console.end_line()

    def _follow_logs(self, stream: ExecStream) -> ExecResult | None:
        """Follow without signalling: Ctrl-C here only stops following."""
        with SigintCounter() as sigint, stream:
            while sigint.count == 0:
                try:
                    chunk = stream.next_chunk(timeout=0.1)
                except StopIteration:
                    self.console.end_line()
                    return stream.result
                if chunk is not None:
                    self.console.write_chunk(chunk)
        self.console.dim("[stopped following; the command keeps running]")
        return None

    def cmd_kill(self, rest: str) -> None:
        words = self._words(rest)
        if not 1 <= len(words) <= 2:
            raise ShellError("usage: kill ID [SIGNAL]")
        sig = words[1] if len(words) == 2 else "TERM"
        exec_id = self._exec_id(words[0])
        self._holding().kill(exec_id, sig)
        self.console.print(f"sent SIG{sig.upper().removeprefix('SIG')} to {exec_id}")

    def cmd_release(self, rest: str) -> None:
        if self.reserved is None:
            raise ShellError("no worker reserved")
        handle, self.reserved = self.reserved, None
        handle.release()
        self.console.print(f"released {handle.worker_name} (reservation {handle.id})")


# -- front ends ---------------------------------------------------------------------------


def run_script(shell: Shell, commands: Iterable[str]) -> int:
    """Scripted mode: stop at the first error (1); else the last remote exit status."""
    try:
        for command in commands:
            shell.execute(command)
    except ShellExit:
        pass
    except ClientError as err:
        shell.console.error(f"xcloud: error: {err}")
        return 1
    except KeyboardInterrupt:
        return 130
    return shell.last_status or 0


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
                            complete_event: CompleteEvent) -> Iterator[Completion]:
            text = document.text_before_cursor
            words = text.split()
            if not words or (len(words) == 1 and not text.endswith(" ")):
                prefix = words[0] if words else ""
                for name in command_names():
                    if name.lower().startswith(prefix.lower()):
                        yield Completion(name, -len(prefix))
                return
            spec = _BY_NAME.get(words[0].lower())
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


def run_interactive(shell: Shell, config: Config) -> int:
    """The prompt_toolkit front end."""
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
        try:
            shell.execute(line)  # typed lines are not split: `;` belongs to the remote shell
        except ShellExit:
            break
        except ClientError as err:
            shell.console.error(f"error: {err}")
        except KeyboardInterrupt:
            shell.console.error("interrupted")
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

    def leave(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, leave)


def run_shell(config: Config, script: str | None = None,
              stdin: IO[str] | None = None) -> int:
    """``xcloud shell``: interactive on a terminal, scripted with ``-c`` or a pipe."""
    from client.api import Grid

    stdin = stdin or sys.stdin
    scripted = script is not None or not stdin.isatty()
    console = Console(sys.stdout, sys.stderr, use_color(config, sys.stdout),
                      remarks_to_err=scripted)
    exit_on_hangup()
    with Grid.connect(config) as grid:
        shell = Shell(grid, console)
        try:
            if script is not None:
                return run_script(shell, split_script(script))
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
             lease_s: float | None = None) -> int:
    """``xcloud run``: reserve, run with live output, release; the remote exit status."""
    from client.api import Grid

    console = Console(sys.stdout, sys.stderr, use_color(config, sys.stderr),
                      remarks_to_err=True)
    target: str | int | None = int(worker) if worker and worker.isdigit() else worker
    started = time.monotonic()
    exit_on_hangup()
    with Grid.connect(config) as grid, \
            grid.reserve(target, any=requirements or None, lease_s=lease_s) as handle:
        log.info("reserved %s in %.2fs", handle.worker, time.monotonic() - started)
        stream = handle.stream(command, timeout=timeout)
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
