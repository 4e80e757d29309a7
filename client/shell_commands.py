"""The shell's commands (``listWorkers``, ``reserveWorker``, ``output``, ...).

:class:`Shell` runs one command line at a time and knows nothing of how lines arrive
(the prompt, ``-c``, a pipe: see :mod:`client.shell`) or of prompt_toolkit; it keeps the
state the prompt, toolbar and completer show (reserved worker, last listing, exec ids).
"""

from __future__ import annotations

import os
import shlex
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from client.console import Console, SigintCounter, describe_exit, follow_output
from client.errors import ClientError
from client.exec_stream import ExecResult, ExecStream, feed_in_background
from client.shell_syntax import (
    COMMANDS,
    ShellError,
    ShellExit,
    find_command,
    reserve_args,
    split_local_input,
)
from client.table import ago, render, workers_table

if TYPE_CHECKING:
    from client.api import Grid, WorkerInfo
    from client.reservation import ReservedWorker


class Shell:
    """The shell's commands, independent of how lines arrive (prompt, -c, pipe)."""

    def __init__(self, grid: Grid, console: Console) -> None:
        self.grid = grid
        self.console = console
        self.reserved: ReservedWorker | None = None
        self.listing: list[WorkerInfo] = []
        self.execs: list[str] = []
        self.job_ids: list[str] = []  # batch jobs submitted here, newest last (completion)
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
        spec = find_command(verb)
        if spec is None:
            raise ShellError(f"unknown command {verb!r}; type `help` for the list")
        getattr(self, f"cmd_{spec.name.lower()}")(rest.strip())

    def _words(self, rest: str) -> list[str]:
        """A local verb's arguments, split as a shell would (a ``# comment`` ends them,
        as it ends a remote command line)."""
        try:
            return shlex.split(rest, comments=True)
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
            spec = find_command(words[0])
            if spec is None:
                raise ShellError(f"unknown command {words[0]!r}")
            aliases = f" (also: {', '.join(spec.aliases)})" if spec.aliases else ""
            self.console.print(f"{spec.usage}{aliases}\n  {spec.help}")
            return
        rows = [[spec.usage.split(" [--")[0], ", ".join(spec.aliases), spec.help]
                for spec in COMMANDS]
        self.console.print(render(["COMMAND", "ALIASES", "WHAT"], rows))

    def cmd_exit(self, _rest: str) -> None:
        raise ShellExit

    def cmd_listworkers(self, _rest: str) -> None:
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
        if extra.get("wait"):
            limit = extra["wait"]
            self.console.dim("waiting for a free worker" + (
                f" (at most {limit:g}s)" if limit != float("inf") else "")
                + "; Ctrl-C stops waiting")
        handle = self.grid.reserve(self._resolve(target), any=req or None, **extra)
        self.reserved = handle
        handle.on_ended(self._ended)
        self.console.ok(f"reserved {handle.worker_name} ({handle.worker}), reservation "
                        f"{handle.id}, lease {handle.lease_s:.0f}s (renewed while connected)")

    def _ended(self, handle: ReservedWorker) -> None:
        if handle.ended_reason != "released":
            self._notify(f"your reservation {handle.id} on {handle.worker_name} ended: "
                         f"{handle.ended_reason}")

    def cmd_myworker(self, _rest: str) -> None:
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
        command, local = split_local_input(rest)
        source = os.path.expanduser(local) if local is not None else None
        if source is not None and os.path.isfile(source):
            stream = handle.stream(command, stdin=True)  # `< FILE` of a file here
            assert stream.stdin is not None
            local_file = open(source, "rb")  # noqa: SIM115 - the feeding thread closes it
            feed_in_background(stream.stdin, local_file, f"stdin-{stream.exec_id}",
                               on_end=local_file.close)
        else:  # no `<`, or a file only the worker has: its shell redirects
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

    def cmd_term(self, rest: str) -> None:
        """A remote terminal (client/terminal.py); whatever happens to it, the shell and
        its reservation stay (a lost reservation says so at the next command)."""
        from client.terminal import run_terminal

        handle = self._holding()
        self.console.end_line()
        self.last_status = run_terminal(handle, rest)
        self.console.dim(f"[terminal closed: exit {self.last_status}]")

    def cmd_start(self, rest: str) -> None:
        if not rest:
            raise ShellError("usage: start CMD")
        exec_id = self._holding().start(rest)
        self.execs.append(exec_id)
        self.console.print(f"started {exec_id} (see `ps`, `logs {exec_id}`, `kill {exec_id}`)")

    def cmd_ps(self, _rest: str) -> None:
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
        from client import shell_jobs

        if shell_jobs.is_job_id(ids[0]):  # a batch job's (j-...), no worker needed
            shell_jobs.logs(self.grid.jobs, self.console, words)
            return
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

    def cmd_put(self, rest: str) -> None:
        from client.file_copy import DATA_PREFIX, ProgressBar, put, put_data

        words = self._words(rest)
        if not 1 <= len(words) <= 2:
            raise ShellError("usage: put LOCAL [REMOTE] | put data:REF [REMOTE]")
        handle = self._holding()
        if words[0].startswith(DATA_PREFIX):  # a stored data object (./data:x is a file)
            placed = put_data(handle, words[0][len(DATA_PREFIX):],
                              words[1] if len(words) == 2 else None)
            how = "held already" if placed.cached else "fetched by the worker"
            self.console.print(f"placed data {placed.sha256[:12]}… → {handle.worker_name}:"
                               f"{placed.remote} ({placed.size} bytes, {how})")
            return
        bar = ProgressBar(os.path.basename(words[0].rstrip("/")) or words[0],
                          self.console.err)
        try:
            result = put(handle, os.path.expanduser(words[0]),
                         words[1] if len(words) == 2 else None, progress=bar)
        finally:
            bar.finish()
        kind = "directory" if result.directory else "file"
        self.console.print(f"put {kind} {result.local} → {handle.worker_name}:{result.remote} "
                           f"({result.size} bytes, {result.rate / (1 << 20):.1f} MiB/s)")

    def cmd_get(self, rest: str) -> None:
        from client.file_copy import ProgressBar, get

        words = self._words(rest)
        if not 1 <= len(words) <= 2:
            raise ShellError("usage: get REMOTE [LOCAL]")
        handle = self._holding()
        bar = ProgressBar(os.path.basename(words[0].rstrip("/")) or words[0],
                          self.console.err)
        try:
            result = get(handle, words[0],
                         os.path.expanduser(words[1]) if len(words) == 2 else None,
                         progress=bar)
        finally:
            bar.finish()
        kind = "directory" if result.directory else "file"
        self.console.print(f"got {kind} {handle.worker_name}:{result.remote} → {result.local} "
                           f"({result.size} bytes, {result.rate / (1 << 20):.1f} MiB/s)")

    def cmd_release(self, rest: str) -> None:
        if self._words(rest):  # `release ID...`: held batch jobs (client/shell_jobs.py)
            from client import shell_jobs

            shell_jobs.release(self.grid.jobs, self.console, self._words(rest))
            return
        if self.reserved is None:
            raise ShellError("no worker reserved")
        handle, self.reserved = self.reserved, None
        handle.release()
        self.console.print(f"released {handle.worker_name} (reservation {handle.id})")


    # -- data objects (docs/data.md; no worker needed) ------------------------------------

    def cmd_data(self, rest: str) -> None:
        """``data put FILE [NAME]``, ``get KEY [PATH]``, ``ls``, ``show KEY``, ``rm KEY``,
        ``pin KEY``, ``unpin KEY``: ``grid.data`` (client/data.py) at the prompt."""
        words = self._words(rest)
        usage = ("usage: data put FILE [NAME] | get KEY [PATH] | ls | show KEY | rm KEY | "
                 "pin KEY | unpin KEY")
        if not words:
            raise ShellError(usage)
        verb, args = words[0].lower(), words[1:]
        arity = {"put": (1, 2), "get": (1, 2), "ls": (0, 0), "show": (1, 1), "rm": (1, 1),
                 "pin": (1, 1), "unpin": (1, 1)}
        if verb not in arity:
            raise ShellError(f"unknown data verb {words[0]!r}; {usage}")
        low, high = arity[verb]
        if not low <= len(args) <= high:
            raise ShellError(usage)
        getattr(self, f"_data_{verb}")(args)

    def _data_put(self, args: list[str]) -> None:
        from client.file_copy import ProgressBar

        path = os.path.expanduser(args[0])
        bar = ProgressBar(os.path.basename(path) or path, self.console.err)
        try:
            ref = self.grid.data.put(path, name=args[1] if len(args) == 2 else None,
                                     progress=bar)
        finally:
            bar.finish()
        self.console.print(f"stored {ref.name}: {ref.sha256}  {ref.size} bytes")

    def _data_get(self, args: list[str]) -> None:
        from client.file_copy import ProgressBar

        bar = ProgressBar(args[0], self.console.err)
        try:
            dest = self.grid.data.get(args[0], os.path.expanduser(args[1])
                                      if len(args) == 2 else None, progress=bar)
        finally:
            bar.finish()
        self.console.print(f"fetched {args[0]} → {dest}")

    def _data_ls(self, _args: list[str]) -> None:
        from client.table import human_bytes

        refs = self.grid.data.ls()
        if not refs:
            self.console.print("no data (store some with `data put FILE`)")
            return
        self.console.print(render(
            ["HASH", "SIZE", "ACCESS", "USED", "NAME"],
            [[r.sha256[:12], human_bytes(r.size) if r.size else "0B",
              r.access + ("*" if r.pinned else ""), ago(r.last_used_at), r.name]
             for r in refs]))

    def _data_show(self, args: list[str]) -> None:
        ref = self.grid.data.show(args[0])
        lines = [f"{'name:':<10}{ref.name}", f"{'owner:':<10}{ref.owner}",
                 f"{'sha256:':<10}{ref.sha256}", f"{'size:':<10}{ref.size}",
                 f"{'access:':<10}{ref.access}" + (f" ({', '.join(ref.share)})"
                                                   if ref.share else ""),
                 f"{'pinned:':<10}{'yes' if ref.pinned else 'no'}"]
        lines += [f"{'kept by:':<10}{row.get('kind')} {row.get('ref')}" for row in ref.refs]
        self.console.print("\n".join(lines))

    def _data_rm(self, args: list[str]) -> None:
        removed = self.grid.data.rm(args[0])
        self.console.print(f"removed {removed} name(s)")

    def _data_pin(self, args: list[str]) -> None:
        self.grid.data.pin(args[0])
        self.console.print(f"pinned {args[0]}")

    def _data_unpin(self, args: list[str]) -> None:
        self.grid.data.unpin(args[0])
        self.console.print(f"unpinned {args[0]}")

    # -- batch jobs (docs/jobs.md; no worker needed): client/shell_jobs.py ------------------

    def cmd_submit(self, rest: str) -> None:
        from client import shell_jobs

        ids = shell_jobs.submit(self.grid.jobs, self.console, rest)
        self.job_ids = (self.job_ids + ids)[-100:]

    def cmd_jobs(self, rest: str) -> None:
        from client import shell_jobs

        shell_jobs.jobs(self.grid.jobs, self.console, self._words(rest))

    def cmd_wait(self, rest: str) -> None:
        from client import shell_jobs

        shell_jobs.wait(self.grid.jobs, self.console, self._words(rest))

    def cmd_results(self, rest: str) -> None:
        from client import shell_jobs

        shell_jobs.results(self.grid.jobs, self.console, self._words(rest))

    def cmd_cancel(self, rest: str) -> None:
        from client import shell_jobs

        shell_jobs.cancel(self.grid.jobs, self.console, self._words(rest))

    def cmd_job(self, rest: str) -> None:
        from client import shell_jobs

        shell_jobs.show(self.grid.jobs, self.console, self._words(rest))

    def cmd_hold(self, rest: str) -> None:
        from client import shell_jobs

        shell_jobs.hold(self.grid.jobs, self.console, self._words(rest))

    def cmd_why(self, rest: str) -> None:
        from client import shell_jobs

        shell_jobs.why(self.grid.jobs, self.console, self._words(rest))
