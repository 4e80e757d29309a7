"""The ``process`` driver: each command is a ``/bin/sh -c`` child in its own process group.

A session is a private work dir (mode 0700); a task is one shell. Not a security
boundary: commands run as the worker's user and see what it sees (docs/exec.md).

Why the pieces look the way they do:

- ``start_new_session=True`` makes the shell a process-group leader, so signals and
  stops reach the whole pipeline (``sleep 30 | cat``), not only the shell.
- The command is prefixed with a one-line prelude that ``cd``s to the directory the
  previous command of the session ended in and installs an EXIT trap writing ``pwd``
  back, so ``cd`` persists between commands while ``$?`` and signals stay untouched.
- The shell is put in its session's cgroup, and given the limits no cgroup enforces
  with ``prlimit(2)``, *before* it runs anything: the prelude first reads one line from
  a gate pipe on stdin, which we write only after that (no ``preexec_fn``, which is
  unsafe in a threaded process). Closing a session kills its cgroup: nothing a command
  started survives it, ``setsid`` or not (worker/executors/containment.py).
- A reaper process kills the worker's commands when the worker dies, even by kill -9.
- A command's pipes (or its pty) and its exit are watched by the worker's one I/O loop
  (worker/io_loop.py: epoll, ``pidfd_open``): no thread per command. A sink that is
  full (``PacedSink``) pauses the reading of that stream, which blocks the command.
- Where the machine gives no cgroups, every task is recorded in ``<state_dir>/process/``
  (in a cgroup, the cgroup is what the reaper and a restart kill: no file per task);
  every task carries ``XCLOUD_*`` variables in its environment, so that a restarted
  worker (and the reaper) can still find what its previous run left behind, including
  processes that left the process group.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal as _signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from broker.config import WorkerConfig
from worker.executors import reaper
from worker.executors.base import (
    Executor,
    ExecutorCapabilities,
    ExecutorContext,
    ExecutorError,
    ExitCallback,
    ExitResult,
    Limits,
    OutputSink,
    PacedSink,
    PolledInput,
    SessionHandle,
    SessionSpec,
    TaskHandle,
    TaskInput,
    TaskSpec,
    paced_sink,
)
from worker.executors.cgroups import CgroupError, SessionCgroup
from worker.executors.containment import Containment
from worker.executors.marked import kill_marked
from worker.executors.process_shell import (
    CWD_FILE,
    PipeInput,
    apply_limits,
    shell_prelude,
    task_env,
)
from worker.io_loop import IoLoop, Reader, Timer
from worker.sessions import remove_tree, safe_name
from worker.terminal import DRAIN_S, PtyInput, attach_prelude, login_shell, open_pty, read_pty

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
KEEP_FINISHED = 256  # finished tasks remembered (for late wait/stop calls)
#: Variables the driver always sets last (a command's env cannot override them): they
#: are how close_session / cleanup_orphans recognise a task's processes.
MARKERS = ("XCLOUD_RESERVATION", "XCLOUD_EXEC_ID", "XCLOUD_WORKDIR")


@dataclass
class _Stream:
    """One output of a task on the loop: a pipe, or the master of its pty."""

    name: str  # "stdout" | "stderr"
    fd: int
    close: Callable[[], None]  # closes fd (the pipe's file object owns a pipe's)
    tty: bool = False
    reader: Reader | None = None


@dataclass
class _Task:
    """A running or finished task. The fields below ``done`` change on the loop only."""

    handle: TaskHandle
    proc: subprocess.Popen[bytes]
    workdir: str
    record: Path
    started: float  # monotonic
    done: threading.Event = field(default_factory=threading.Event)
    result: ExitResult | None = None
    on_exit: list[ExitCallback] = field(default_factory=list)  # under the executor's lock
    streams: list[_Stream] = field(default_factory=list)  # those not at their end yet
    returncode: int | None = None  # once the shell was reaped
    duration: float = 0.0
    drain: Timer | None = None  # a tty's deadline for its output after the shell's exit
    cgroup: SessionCgroup | None = None
    oom_before: int = 0
    stdin: PolledInput | None = None  # TaskSpec.stdin: the shell's stdin (or its pty)
    pty: PtyInput | None = None  # TaskSpec.tty: the master of its terminal


class ProcessExecutor(Executor):
    """Runs commands as local process groups. ``state_dir`` holds the task records.

    Driver state: a session's is ``{"owner", "limits"}`` (the limits it was opened with),
    a task's ``{"pgid"}``. ``cgroups``: the containment mode (``auto``, ``v2``, ``v1``,
    ``off``; default the config's ``process_cgroups``), see worker/executors/cgroups.py.
    """

    name: ClassVar[str] = "process"
    STATE_VERSION: ClassVar[int] = 1

    def __init__(self, state_dir: Path | str, *, config: WorkerConfig | None = None,
                 default_limits: Limits | None = None, kill_grace_s: float = 5.0,
                 read_size: int = READ_SIZE, cgroups: str | None = None,
                 worker_id: str = "", loop: IoLoop | None = None) -> None:
        self.config = config or WorkerConfig()
        self.state_dir = Path(state_dir)
        self.records_dir = self.state_dir / "process"
        self.default_limits = default_limits or Limits()
        self.kill_grace_s = kill_grace_s
        self.read_size = read_size
        self._lock = threading.Lock()
        self._tasks: dict[tuple[str, str], _Task] = {}
        # the same tasks by session: a short job's session close looks at its own only
        self._by_session: dict[str, dict[str, _Task]] = {}
        self._finished: deque[tuple[tuple[str, str], _Task]] = deque()
        # One loop thread serves all of this driver's commands (and the exec layer's
        # timers); held so consecutive commands reuse it, until close().
        self.io_loop = self._loop = loop or IoLoop("exec-io")
        self._loop.hold()
        self._closed = False
        self.containment = Containment(self.state_dir, self.records_dir,
                                       cgroups or self.config.process_cgroups, worker_id)

    # -- building and description ------------------------------------------------------

    @classmethod
    def create(cls, context: ExecutorContext) -> ProcessExecutor:
        executor = cls(context.state_dir, config=context.config,
                       kill_grace_s=context.kill_grace_s, worker_id=context.worker_id)
        containment = executor.containment
        # Without cgroups some escapes are possible (docs/exec.md): say so louder.
        degraded = not containment.layout.version and executor.config.process_cgroups != "off"
        log.log(logging.WARNING if degraded else logging.INFO, "process executor: %s",
                containment.describe())
        return executor

    @classmethod
    def fingerprint(cls, config: WorkerConfig) -> ExecutorCapabilities:  # noqa: ARG003
        return ExecutorCapabilities(name=cls.name, isolation="none", security_boundary=False,
                                    limits=frozenset({"memory_bytes", "pids"}), stdin=True,
                                    tty=True, gpus="env")

    # -- sessions ----------------------------------------------------------------------

    def open_session(self, spec: SessionSpec) -> SessionHandle:
        workdir = Path(spec.workdir)
        try:
            workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            workdir.chmod(0o700)
            if spec.carry_cwd:
                (workdir / CWD_FILE).parent.mkdir(mode=0o700, exist_ok=True)
        except OSError as err:
            raise ExecutorError(f"cannot create work dir {workdir}: {err}") from err
        state: dict[str, Any] = {"owner": spec.owner, "limits": spec.limits.to_dict()}
        if not spec.carry_cwd:  # (absent: carried, as in handles written before)
            state["carry_cwd"] = False
        handle = SessionHandle(session_id=spec.session_id, executor=self.name,
                               workdir=str(workdir), driver_state=self.make_state(state))
        self.containment.session(spec.session_id, self._limits(handle))
        return handle

    def _limits(self, session: SessionHandle) -> Limits:
        """The session's limits (ExecutorError for a handle this driver cannot read)."""
        data = Limits.from_dict(self.state_of(session).get("limits"))
        default = self.default_limits
        return Limits(
            cpus=default.cpus if data.cpus is None else data.cpus,
            memory_bytes=default.memory_bytes if data.memory_bytes is None else data.memory_bytes,
            pids=default.pids if data.pids is None else data.pids,
        )

    def close_session(self, session: SessionHandle) -> None:
        """Stop every task of the session (TERM, KILL after the grace), remove its dir.

        A handle of a layout this driver cannot read still gets its processes killed (by
        their markers), but its work dir is left to the caller: the path is not trusted.
        """
        with self._lock:
            tasks = list(self._by_session.get(session.session_id, {}).values())
        running = [t for t in tasks if not t.done.is_set()]
        cgroup = self.containment.existing(session.session_id)
        for task in running:
            self._killpg(task, _signal.SIGTERM)
        termed = cgroup.signal(_signal.SIGTERM) if cgroup is not None else 0
        deadline = time.monotonic() + self.kill_grace_s
        for task in running:
            task.done.wait(max(0.0, deadline - time.monotonic()))
        while termed and cgroup is not None and cgroup.pids_inside() and (
                time.monotonic() < deadline):
            time.sleep(0.05)  # the rest of the grace, for what left the process groups
        for task in running:
            if not task.done.is_set():
                self._killpg(task, _signal.SIGKILL)
                reaper.kill_sessions([task.proc.pid])
        # Whatever left the process groups (setsid, nohup &) is still in the cgroup; or,
        # without one, still carries the markers (unless it scrubbed them). A removed
        # cgroup proves nothing is left: the scan of every process's environment (the
        # dearest step of a short job's end) is only for sessions without one.
        if not self.containment.drop(session.session_id):
            kill_marked(lambda env: env.get("XCLOUD_RESERVATION") == session.session_id
                              and env.get("XCLOUD_WORKDIR") == session.workdir)
        for task in running:
            if not task.done.wait(self.kill_grace_s):
                self._abandon(task)  # a pipe still held open by a process we cannot see
                task.done.wait(2.0)
        for task in tasks:
            task.record.unlink(missing_ok=True)
        if self.knows(session):
            remove_tree(Path(session.workdir))

    def recover(self, sessions: list[SessionHandle]) -> list[SessionHandle]:
        """Sessions whose work dir survived; their old processes are never recoverable."""
        return [s for s in sessions if self.knows(s) and Path(s.workdir).is_dir()]

    def cleanup_orphans(self, keep: set[str]) -> int:  # noqa: ARG002 - docstring says why
        """Kill every process a previous run of this worker left (recorded or marked).

        Processes cannot be re-attached after a restart (their output pipes died with the
        old worker), so all are orphans whatever ``keep`` says; ``keep`` only matters for
        sessions (work dirs), which ``recover`` handles.
        """
        killed = self.containment.cleanup_left()
        with self._lock:
            mine = {t.record for t in self._tasks.values()}
        records = []
        if self.records_dir.is_dir():
            for path in self.records_dir.glob("*.json"):
                if path in mine:
                    continue
                try:
                    records.append(json.loads(path.read_text()))
                except (OSError, ValueError) as err:
                    log.warning("unreadable task record %s: %s", path, err)
                path.unlink(missing_ok=True)
        root = str(self.state_dir.resolve()) + os.sep
        running_markers = {(t.handle.session_id, t.handle.task_id) for t in self._tasks.values()}
        recorded = {(r.get("session_id"), r.get("task_id")) for r in records}

        def orphan(env: dict[str, str]) -> bool:
            key = (env.get("XCLOUD_RESERVATION"), env.get("XCLOUD_EXEC_ID"))
            if key in running_markers:
                return False
            workdir = env.get("XCLOUD_WORKDIR", "")
            return key in recorded or workdir.startswith(root)

        killed += kill_marked(orphan)
        if killed:
            log.warning("killed %d process(es) left over by a previous run", killed)
        return killed

    # -- tasks -------------------------------------------------------------------------

    def start(self, spec: TaskSpec, on_output: OutputSink) -> TaskHandle:
        session = spec.session
        limits = self._limits(session)
        workdir = Path(session.workdir)
        if not workdir.is_dir():
            raise ExecutorError(f"session {session.session_id} has no work dir {workdir}")
        key = (session.session_id, spec.task_id)
        with self._lock:
            old = self._tasks.get(key)
            if old is not None and not old.done.is_set():
                raise ExecutorError(f"task {spec.task_id} is already running")
        try:
            cgroup = self.containment.session(session.session_id, limits)
        except CgroupError as err:
            raise ExecutorError(f"cannot prepare the session's cgroup: {err}") from err
        rlimits = Limits(
            memory_bytes=None if cgroup and "memory_bytes" in cgroup.limited
            else limits.memory_bytes,
            pids=None if cgroup and "pids" in cgroup.limited else limits.pids)
        gated = cgroup is not None or rlimits.memory_bytes is not None or (
            rlimits.pids is not None)
        env = task_env(spec, workdir)
        carry_cwd = self.state_of(session).get("carry_cwd") is not False
        if carry_cwd:
            (workdir / CWD_FILE).parent.mkdir(mode=0o700, exist_ok=True)
        # With a tty (worker/terminal.py) the shell's first act makes the pty its own.
        master, slave, path = open_pty(spec.tty) if spec.tty else (-1, -1, "")
        piped = spec.stdin and not spec.tty
        script = (shell_prelude(workdir, gated, stdin=piped, carry_cwd=carry_cwd)
                  + (attach_prelude(path) if spec.tty else "")
                  + (spec.command or login_shell()))
        out: int = slave if spec.tty else subprocess.PIPE
        started_at = time.time()
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", script], cwd=workdir, env=env,
                stdin=subprocess.PIPE if gated or piped else (
                    slave if spec.tty else subprocess.DEVNULL),
                stdout=out, stderr=out, start_new_session=True, close_fds=True, bufsize=0,
            )
        except OSError as err:
            if spec.tty:
                os.close(master)
            raise ExecutorError(f"cannot start /bin/sh in {workdir}: {err}") from err
        finally:
            if spec.tty:
                os.close(slave)  # the shell holds it: EIO on the master once all are gone
        started = time.monotonic()
        oom_before = cgroup.oom_kills() if cgroup is not None else 0
        if gated:
            try:
                apply_limits(proc, rlimits, cgroup, keep_stdin=piped)
            except ExecutorError:
                if spec.tty:
                    os.close(master)
                raise
        handle = TaskHandle(task_id=spec.task_id, executor=self.name,
                            session_id=session.session_id, pid=proc.pid, started_at=started_at,
                            driver_state=self.make_state({"pgid": proc.pid}))
        name = f"{safe_name(session.session_id)}.{safe_name(spec.task_id)}.json"
        record = self.records_dir / name
        task = _Task(handle=handle, proc=proc, workdir=str(workdir), record=record,
                     started=started, cgroup=cgroup, oom_before=oom_before)
        if piped and proc.stdin is not None:  # after the gate: the rest is the user's
            task.stdin = PipeInput(proc.stdin)
        if spec.tty:
            task.stdin = task.pty = PtyInput(master)
        if cgroup is None:  # in a cgroup, the cgroup finds it (reaper, restart): no file
            self._write_record(task)
        if spec.tty:
            task.streams = [_Stream("stdout", master, lambda: os.close(master), tty=True)]
        else:
            assert proc.stdout is not None
            assert proc.stderr is not None
            task.streams = [_Stream(name, pipe.fileno(), pipe.close)
                            for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))]
        for stream in task.streams:
            os.set_blocking(stream.fd, False)
        with self._lock:
            self._tasks[key] = task
            self._by_session.setdefault(session.session_id, {})[spec.task_id] = task
        self._loop.call_soon(self._attach, task, on_output)
        log.debug("started task %s of session %s as pgid %d", spec.task_id,
                  session.session_id, proc.pid)
        return handle

    def task_input(self, handle: TaskHandle) -> TaskInput | None:
        return self._task(handle).stdin

    def resize(self, handle: TaskHandle, rows: int, cols: int) -> None:
        pty = self._task(handle).pty
        if pty is None:
            raise ExecutorError(f"task {handle.task_id} has no terminal")
        pty.resize(rows, cols)

    def wait(self, handle: TaskHandle, timeout: float | None = None) -> ExitResult | None:
        task = self._task(handle)
        if not task.done.wait(timeout):
            return None
        return task.result

    def signal(self, handle: TaskHandle, signum: int) -> None:
        self._killpg(self._task(handle), signum)

    def stop(self, handle: TaskHandle, grace_s: float = 5.0) -> ExitResult | None:
        """TERM the group; after ``grace_s`` KILL it and anything marked as this task's."""
        task = self._task(handle)
        if task.done.is_set():
            return task.result
        self._killpg(task, _signal.SIGTERM)
        if task.done.wait(grace_s):
            return task.result
        self._killpg(task, _signal.SIGKILL)
        if not task.done.is_set():
            reaper.kill_sessions([task.proc.pid])
        kill_marked(lambda env: env.get("XCLOUD_RESERVATION") == handle.session_id
                          and env.get("XCLOUD_EXEC_ID") == handle.task_id
                          and env.get("XCLOUD_WORKDIR") == task.workdir)
        if task.done.wait(grace_s):
            return task.result
        self._abandon(task)
        task.done.wait(2.0)
        return task.result

    def notify_exit(self, handle: TaskHandle, callback: ExitCallback) -> None:
        """From the I/O loop when the task ends (at once, here, if it already has)."""
        task = self._task(handle)
        with self._lock:
            if not task.done.is_set():
                task.on_exit.append(callback)
                return
        assert task.result is not None
        callback(task.result)

    def close(self) -> None:
        """Stop what still runs, remove this run's cgroups, let the reaper go."""
        with self._lock:
            tasks = list(self._tasks.values())
        for task in tasks:
            if not task.done.is_set():
                self.stop(task.handle, self.kill_grace_s)
        self.containment.close()
        if not self._closed:
            self._closed = True
            self._loop.release()

    # -- internals ---------------------------------------------------------------------

    def _task(self, handle: TaskHandle) -> _Task:
        with self._lock:
            task = self._tasks.get((handle.session_id, handle.task_id))
        if task is None:
            raise ExecutorError(f"no task {handle.task_id} in session {handle.session_id}")
        return task

    def _write_record(self, task: _Task) -> None:
        data = {"session_id": task.handle.session_id, "task_id": task.handle.task_id,
                "pgid": task.proc.pid, "workdir": task.workdir,
                "started_at": task.handle.started_at}
        try:
            self.records_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = task.record.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, task.record)
        except OSError as err:  # the markers in the environment still find it later
            log.warning("cannot record task %s: %s", task.handle.task_id, err)

    # -- on the I/O loop ---------------------------------------------------------------

    def _attach(self, task: _Task, sink: OutputSink) -> None:
        """Start reading the task's outputs into ``sink`` and watching its exit."""
        paced = paced_sink(sink)
        for stream in task.streams:
            stream.reader = self._loop.add_reader(
                stream.fd, functools.partial(self._on_readable, task, stream, sink, paced))
        self._loop.watch_exit(task.proc, functools.partial(self._on_exit, task))

    def _on_readable(self, task: _Task, stream: _Stream, sink: OutputSink,
                     paced: PacedSink | None) -> None:
        reader = stream.reader
        assert reader is not None
        try:
            data = read_pty(stream.fd, self.read_size) if stream.tty else os.read(
                stream.fd, self.read_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.warning("reading %s of %s failed: %s", stream.name, task.handle.task_id, err)
            data = b""
        if not data:
            self._end_stream(task, stream)
            self._maybe_finish(task)
            return
        try:
            if paced is None:
                sink(stream.name, data)
            elif not paced.offer(stream.name, data, reader.resume):
                reader.pause()  # full: the command's writes block until the sink has room
        except Exception:
            log.exception("output sink of %s failed; output dropped", task.handle.task_id)

    @staticmethod
    def _end_stream(task: _Task, stream: _Stream) -> None:
        if stream in task.streams:
            task.streams.remove(stream)
            if stream.reader is not None:
                stream.reader.remove()
            with contextlib.suppress(OSError):
                stream.close()

    def _on_exit(self, task: _Task, returncode: int) -> None:
        """The shell was reaped: the result follows once its outputs reached their end."""
        task.returncode = returncode
        task.duration = time.monotonic() - task.started
        if any(stream.tty for stream in task.streams):
            # A background process that kept the terminal is not ours to wait for.
            task.drain = self._loop.call_later(DRAIN_S, self._abandon_now, task)
        self._maybe_finish(task)

    def _abandon(self, task: _Task) -> None:
        """Stop reading the task's outputs (a process we cannot kill holds them open)."""
        self._loop.call_soon(self._abandon_now, task)

    def _abandon_now(self, task: _Task) -> None:
        for stream in list(task.streams):
            self._end_stream(task, stream)
        self._maybe_finish(task)

    def _maybe_finish(self, task: _Task) -> None:
        """Publish the result once the shell has exited and its outputs have ended."""
        if task.returncode is None or task.streams or task.done.is_set():
            return
        if task.drain is not None:
            task.drain.cancel()
        returncode = task.returncode
        # The OOM killer struck in the session's cgroup while the task ran (it may have
        # taken a child of the shell rather than the shell itself).
        oom = task.cgroup is not None and task.cgroup.oom_kills() > task.oom_before
        if returncode < 0:
            task.result = ExitResult(exit_code=None, signal=-returncode,
                                     duration_s=task.duration, oom_killed=oom)
        else:
            task.result = ExitResult(exit_code=returncode, duration_s=task.duration,
                                     oom_killed=oom)
        task.record.unlink(missing_ok=True)
        with self._lock:  # keep the newest finished tasks only: their results were collected
            task.done.set()
            callbacks, task.on_exit = task.on_exit, []
            # oldest first, without a scan of every task per exit
            self._finished.append(((task.handle.session_id, task.handle.task_id), task))
            while len(self._finished) > KEEP_FINISHED:
                key, old = self._finished.popleft()
                if self._tasks.get(key) is old:
                    del self._tasks[key]
                    of_session = self._by_session.get(key[0], {})
                    of_session.pop(key[1], None)
                    if not of_session:
                        self._by_session.pop(key[0], None)
        for callback in callbacks:
            try:
                callback(task.result)
            except Exception:
                log.exception("exit callback of %s failed", task.handle.task_id)

    @staticmethod
    def _killpg(task: _Task, signum: int) -> None:
        # Once the task is done its group may be gone and the id reused: leave it alone.
        if task.done.is_set():
            return
        try:
            os.killpg(task.proc.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError as err:
            log.warning("cannot signal process group %d: %s", task.proc.pid, err)
