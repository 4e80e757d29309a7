"""The docker driver: one hardened container per reservation, one ``docker exec`` per command.

A reservation is an interactive session (like xCloud's worker container), so its container
lives exactly as long as the reservation and every command runs inside it through the
engine's exec API. The session's host work dir is bind-mounted at ``/work``: files persist
between commands, and so does a ``cd`` (the wrapper keeps the last directory in
``/work/.xcloud/cwd``, as the process executor does with its own work dir).

The parts: ``container`` (making, finding and removing hardened containers), ``wrapper``
(the shell scripts that run inside them), ``task`` (one exec: output and exit),
``state`` (the driver state in the handles), ``reconcile`` (after a restart) and
``fingerprint`` (the engine probe behind the capabilities).
"""

from __future__ import annotations

import logging
import signal as _signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from broker.config import WorkerConfig
from worker.executors.base import (
    Executor,
    ExecutorCapabilities,
    ExecutorContext,
    ExecutorError,
    ExitResult,
    OutputSink,
    SessionHandle,
    SessionSpec,
    TaskHandle,
    TaskInput,
    TaskSpec,
    WorkdirAccess,
)
from worker.executors.docker import reconcile
from worker.executors.docker.container import WORK, Containers
from worker.executors.docker.fingerprint import docker_capabilities
from worker.executors.docker.state import STATE_VERSION, SessionState, TaskState
from worker.executors.docker.task import (
    SocketInput,
    Task,
    attached_output,
    exit_result,
    pump,
    task_env,
    wait_started,
)
from worker.executors.docker.wrapper import (
    SIGNAL_ALL_SCRIPT,
    SIGNAL_SCRIPT,
    WRAPPER,
    task_key,
)
from worker.terminal import CONTAINER_LOGIN_SHELL, tty_prelude

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)

CLOSED_TASKS_KEPT = 1024


@dataclass
class _Session:
    handle: SessionHandle
    state: SessionState
    lock: threading.Lock = field(default_factory=threading.Lock)
    tasks: dict[str, Task] = field(default_factory=dict)
    closing: bool = False

    @property
    def container_id(self) -> str:
        return self.state.container_id

    def save(self) -> None:
        """Write the state back into the handle (the exec layer holds the same object)."""
        self.handle.driver_state = self.state.dump()


class DockerExecutor(Executor):
    """Sessions are containers, tasks are execs. Thread-safe.

    ``worker_id`` labels every container (``xcloud.worker``) so that a restarted worker
    finds exactly its own leftovers, ``state_dir`` (``xcloud.state_dir``) so that whoever
    started the worker can sweep them; ``config`` supplies the image and limit defaults.
    ``client`` (a ``docker.DockerClient``) is for tests; by default one is made with
    ``docker.from_env()`` on first use. ``kill_grace_s``: how long close_session lets
    commands handle TERM before the container is removed.
    """

    name: ClassVar[str] = "docker"
    STATE_VERSION: ClassVar[int] = STATE_VERSION

    def __init__(
        self,
        config: WorkerConfig | None = None,
        *,
        worker_id: str,
        client: docker.DockerClient | None = None,
        kill_grace_s: float = 5.0,
        state_dir: Path | str | None = None,
    ) -> None:
        if not worker_id:
            raise ExecutorError("the docker executor needs the worker id (for its labels)")
        self.config = config or WorkerConfig()
        self.worker_id = worker_id
        self.kill_grace_s = kill_grace_s
        self.containers = Containers(self.config, worker_id, client, state_dir)
        self._lock = threading.Lock()  # guards _sessions and _session_locks
        self._sessions: dict[str, _Session] = {}
        self._session_locks: dict[str, threading.Lock] = {}
        # Tasks of closed sessions, so a wait() racing close_session still gets its
        # result ("session closed"); bounded, oldest dropped first.
        self._closed_tasks: OrderedDict[tuple[str, str], Task] = OrderedDict()

    @classmethod
    def create(cls, context: ExecutorContext) -> DockerExecutor:
        return cls(context.config, worker_id=context.worker_id,
                   kill_grace_s=context.kill_grace_s, state_dir=context.state_dir)

    @classmethod
    def fingerprint(cls, config: WorkerConfig) -> ExecutorCapabilities:
        return docker_capabilities(config)

    @classmethod
    def workdir_access(cls, session: SessionHandle) -> WorkdirAccess:
        """At ``/work``, handed to the container user as the session's state says; a
        state this driver cannot read hands nothing over."""
        try:
            return SessionState.of(session).access()
        except ExecutorError:
            return WorkdirAccess(mount=WORK)

    @property
    def client(self) -> docker.DockerClient:
        """The SDK client, created on first use (importing the SDK only then)."""
        return self.containers.client

    @property
    def user(self) -> str:
        return self.containers.user

    def close(self) -> None:
        self.containers.close()

    # -- sessions -----------------------------------------------------------------

    def _session_lock(self, session_id: str) -> threading.Lock:
        with self._lock:
            return self._session_locks.setdefault(session_id, threading.Lock())

    def open_session(self, spec: SessionSpec) -> SessionHandle:
        """Create (or, for a session id already running here, reuse) its container."""
        containers = self.containers
        params = containers.params(spec)
        workdir = Path(spec.workdir)
        with self._session_lock(spec.session_id):
            with self._lock:
                known = self._sessions.get(spec.session_id)
            if (known is not None and not known.closing
                    and containers.running(known.container_id)):
                return known.handle
            how = containers.prepare_workdir(workdir, params.user)
            cid = ""
            for summary in containers.find(spec.session_id):
                if summary.get("State") == "running" and not cid:
                    cid = str(summary["Id"])
                    log.info("session %s: reusing container %s", spec.session_id, cid[:12])
                else:
                    containers.remove(str(summary["Id"]))
            if not cid:
                cid = containers.create(spec.session_id, str(workdir), params)
            state = SessionState(container_id=cid, params=params, workdir_access=how)
            handle = SessionHandle(session_id=spec.session_id, executor=self.name,
                                   workdir=str(workdir), driver_state=state.dump())
            with self._lock:
                self._sessions[spec.session_id] = _Session(handle, state)
            return handle

    def _adopt(self, handle: SessionHandle) -> _Session:
        """The internal state of a session handle (made on first use after a restart)."""
        with self._lock:
            sess = self._sessions.get(handle.session_id)
            if sess is None:
                try:
                    state = SessionState.of(handle)
                except ExecutorError as err:
                    raise ExecutorError(f"session {handle.session_id}: {err}") from None
                sess = _Session(handle, state)
                self._sessions[handle.session_id] = sess
            return sess

    def _recreate(self, sess: _Session, why: str) -> str:
        """Replace a dead session container (e.g. its PID 1 was OOM-killed)."""
        handle, state = sess.handle, sess.state
        if state.params is None:
            raise ExecutorError(f"session {handle.session_id}: container gone ({why}) and "
                                "the handle lacks what is needed to recreate it")
        old = state.container_id
        log.warning("session %s: container %s is %s; recreating it (the work dir is kept, "
                    "processes and /tmp are lost)", handle.session_id, old[:12], why)
        if old:
            self.containers.remove(old)
        state.container_id = self.containers.create(handle.session_id, handle.workdir,
                                                    state.params)
        state.recreated += 1
        sess.save()
        return state.container_id

    def close_session(self, session: SessionHandle) -> None:
        """TERM the running commands, KILL what is left after the grace by removing the
        container (force). The host work dir is left to the caller. A handle this driver
        cannot read is cleaned up by its session id (the containers labelled with it)."""
        containers = self.containers
        with self._session_lock(session.session_id):
            with self._lock:
                sess = self._sessions.get(session.session_id)
            state: SessionState | None = sess.state if sess else None
            if state is None:
                try:
                    state = SessionState.of(session)
                except ExecutorError:
                    state = None
            if sess is not None:
                sess.closing = True
            cid = state.container_id if state else ""
            running = [t for t in (sess.tasks.values() if sess else ()) if not t.done.is_set()]
            if running and cid:
                for task in running:
                    task.signals.add(_signal.SIGTERM)
                containers.run(cid, ["/bin/sh", "-c", SIGNAL_ALL_SCRIPT, "xcloud", "TERM"],
                               check=False)
                deadline = time.monotonic() + self.kill_grace_s
                for task in running:
                    task.done.wait(max(0.0, deadline - time.monotonic()))
            tasks = list(sess.tasks.values()) if sess else []
            with self._lock:
                self._sessions.pop(session.session_id, None)
                for task in tasks:
                    self._closed_tasks[(session.session_id, task.handle.task_id)] = task
                while len(self._closed_tasks) > CLOSED_TASKS_KEPT:
                    self._closed_tasks.popitem(last=False)
            found = containers.find(session.session_id)
            # Files made by the container's uid: let the (other-uid) caller delete them.
            # Unknown (an unreadable handle): open them up too, in the container found.
            target = cid or next((str(s["Id"]) for s in found
                                  if s.get("State") == "running"), "")
            if target and (state is None or state.workdir_access == "open"):
                containers.run(target, ["chmod", "-R", "a+rwX", WORK], check=False)
            ids = {cid} if cid else set()
            ids.update(str(s["Id"]) for s in found)
            for container in ids:
                containers.remove(container)
        for task in tasks:
            if task.thread is not None:
                task.thread.join(timeout=10)
        with self._lock:
            self._session_locks.pop(session.session_id, None)

    def recover(self, sessions: list[SessionHandle]) -> list[SessionHandle]:
        """The sessions whose containers still run; their stale commands are killed."""
        alive = reconcile.live_sessions(self.containers, sessions)
        with self._lock:
            for handle, state in alive:
                self._sessions[handle.session_id] = _Session(handle, state)
        return [handle for handle, _ in alive]

    def cleanup_orphans(self, keep: set[str]) -> int:
        """Remove this worker's containers whose session is not in ``keep``."""
        removed = reconcile.remove_orphans(self.containers, keep)
        with self._lock:
            for session_id in removed:
                self._sessions.pop(session_id, None)
        return len(removed)

    # -- tasks --------------------------------------------------------------------

    def _exec_create(self, sess: _Session, spec: TaskSpec, key: str) -> tuple[str, str]:
        """(container id, exec id); recreates a dead session container once."""
        import docker.errors

        api = self.client.api
        command = spec.command or CONTAINER_LOGIN_SHELL  # no command: a tty's login shell
        if spec.tty:  # the engine sizes the pty only after the start: size it first thing
            command = tty_prelude(spec.tty) + command
        cmd = ["/bin/sh", "-c", WRAPPER, "xcloud", key, command]
        env = task_env(spec)
        for attempt in (1, 2):
            cid = sess.container_id
            try:
                if not cid:
                    raise docker.errors.NotFound("no container")
                created = api.exec_create(cid, cmd, stdout=True, stderr=True,
                                          stdin=spec.stdin or spec.tty is not None,
                                          tty=spec.tty is not None, user=self.user,
                                          workdir=WORK, environment=env)
                return cid, str(created["Id"])
            except docker.errors.APIError as err:
                gone = isinstance(err, docker.errors.NotFound) or err.status_code == 409
                if not gone or attempt == 2:
                    raise ExecutorError(f"cannot start the command: {err}") from err
                self._recreate(sess, self.containers.dead_reason(cid) if cid else "gone")
        raise AssertionError("unreachable")

    def start(self, spec: TaskSpec, on_output: OutputSink) -> TaskHandle:
        sess = self._adopt(spec.session)
        key = task_key(spec.task_id)
        with sess.lock:
            if sess.closing:
                raise ExecutorError(f"session {sess.handle.session_id} is closing")
            old = sess.tasks.get(spec.task_id)
            if old is not None and not old.done.is_set():
                raise ExecutorError(f"task {spec.task_id} is already running")
            cid, exec_id = self._exec_create(sess, spec, key)
            handle = TaskHandle(
                task_id=spec.task_id,
                executor=self.name,
                session_id=sess.handle.session_id,
                started_at=time.time(),
                driver_state=TaskState(container_id=cid, exec_id=exec_id).dump(),
            )
            task = Task(handle, key, cid, exec_id, on_output)
            try:
                # Started here, not in the reader thread: once start() returns the
                # process exists, so a signal() right after it finds it.
                if spec.tty:  # the engine's pty: raw output, no stream multiplexing
                    conn = self.client.api.exec_start(exec_id, socket=True, tty=True)
                    task.stdin = SocketInput(conn)
                    task.stream = attached_output(conn, tty=True)
                    try:  # for images without stty; the wrapper's stty comes first
                        self.client.api.exec_resize(exec_id, height=spec.tty.rows,
                                                    width=spec.tty.cols)
                    except Exception as err:  # the command runs anyway: not fatal
                        log.info("task %s: cannot size its terminal: %s", spec.task_id, err)
                elif spec.stdin:  # one connection both ways: output in, input out
                    conn = self.client.api.exec_start(exec_id, socket=True)
                    task.stdin = SocketInput(conn)
                    task.stream = attached_output(conn)
                else:
                    task.stream = self.client.api.exec_start(exec_id, stream=True,
                                                             demux=True)
            except Exception as err:
                raise ExecutorError(f"cannot start the command: {err}") from err
            handle.pid = wait_started(self.containers, exec_id)
            sess.tasks[spec.task_id] = task
        task.thread = threading.Thread(
            target=self._read, args=(sess, task, time.monotonic()),
            name=f"docker-exec-{spec.task_id}", daemon=True,
        )
        task.thread.start()
        # spec.timeout_s is the exec layer's to enforce (wait(timeout) then stop()), as
        # with the process executor: enforcing it here too would TERM the group twice.
        return handle

    def _read(self, sess: _Session, task: Task, t0: float) -> None:
        """Reader thread: forward output, then work out how the command ended."""
        error = pump(task)
        duration = time.monotonic() - t0
        try:
            params = sess.state.params
            result = exit_result(self.containers, task, workdir=sess.handle.workdir,
                                 closing=sess.closing, duration=duration, error=error,
                                 memory_bytes=params.memory_bytes if params else None)
        except Exception as exc:
            log.exception("task %s: cannot determine its exit", task.handle.task_id)
            result = ExitResult(exit_code=None, duration_s=duration, error=str(exc))
        task.result = result
        task.done.set()

    def _task(self, handle: TaskHandle) -> Task:
        with self._lock:
            sess = self._sessions.get(handle.session_id)
            task = sess.tasks.get(handle.task_id) if sess else None
            if task is None:
                task = self._closed_tasks.get((handle.session_id, handle.task_id))
        if task is None:
            raise ExecutorError(f"unknown task {handle.task_id} (session {handle.session_id})")
        return task

    def task_input(self, handle: TaskHandle) -> TaskInput | None:
        return self._task(handle).stdin

    def resize(self, handle: TaskHandle, rows: int, cols: int) -> None:
        """The engine sets the exec's pty size (and its foreground group gets SIGWINCH)."""
        task = self._task(handle)
        if task.stdin is None or task.done.is_set():
            raise ExecutorError(f"task {handle.task_id} has no terminal")
        try:
            self.client.api.exec_resize(task.exec_id, height=rows, width=cols)
        except Exception as err:
            raise ExecutorError(f"cannot resize the terminal: {err}") from err

    def wait(self, handle: TaskHandle, timeout: float | None = None) -> ExitResult | None:
        task = self._task(handle)
        if not task.done.wait(timeout):
            return None
        return task.result

    def signal(self, handle: TaskHandle, signum: int) -> None:
        """Deliver ``signum`` to the command's process group, from inside the container."""
        task = self._task(handle)
        if task.done.is_set():
            return
        try:
            name = _signal.Signals(signum).name.removeprefix("SIG")
        except ValueError:
            raise ExecutorError(f"unknown signal {signum}") from None
        task.signals.add(signum)
        try:
            self.containers.run(task.container_id,
                                ["/bin/sh", "-c", SIGNAL_SCRIPT, "xcloud", task.key, name])
        except ExecutorError as err:
            if task.done.is_set():  # it ended meanwhile: nothing left to signal
                return
            raise ExecutorError(f"cannot signal task {handle.task_id}: {err}") from err
