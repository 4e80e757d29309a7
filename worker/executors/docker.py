"""The docker executor: one hardened container per reservation, one ``docker exec`` per command.

A reservation is an interactive session (like xCloud's worker container), so its container
lives exactly as long as the reservation and every command runs inside it through the
engine's exec API. The session's host work dir is bind-mounted at ``/work``: files persist
between commands, and so does a ``cd`` (the wrapper keeps the last directory in
``/work/.xcloud/cwd``, as the process executor does with its own work dir).

Every session container is hardened the same way (see docs/docker.md): network mode
``none`` (``host`` only when both the worker owner and the reservation allow a network),
all capabilities dropped, ``no-new-privileges``, a non-root user, a read-only root file
system with a size-limited tmpfs on ``/tmp``, and memory (no swap), CPU and pids limits.

The docker SDK is imported on first use, not at import time: the idle agent must stay
small unless this executor is actually selected.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal as _signal
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.config import WorkerConfig
from worker.executors.base import (
    Executor,
    ExecutorError,
    ExitResult,
    Limits,
    OutputSink,
    SessionHandle,
    SessionSpec,
    TaskHandle,
    TaskSpec,
)

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)

LABEL_WORKER = "xcloud.worker"
LABEL_SESSION = "xcloud.session"
LABEL_OWNER = "xcloud.owner"
LABEL_EXECUTOR = "xcloud.executor"

WORK = "/work"
TMPFS_MIN = 16 * 1024 * 1024
TMPFS_MAX = 1024 * 1024 * 1024
DEFAULT_USER = "1000:1000"
CLOSED_TASKS_KEPT = 1024
PID_WAIT_S = 5.0

# PID 1 of a session container. tini when the image has it; otherwise a shell whose
# `wait` reaps the orphans that commands leave behind (a bare `sleep` as PID 1 would
# leave them as zombies, eating into the pids limit) and that exits on TERM.
KEEPALIVE = (
    "command -v tini >/dev/null 2>&1 && exec tini -s -- sleep 2147483647; "
    'trap "exit 0" TERM; while :; do sleep 2147483647 & wait; done'
)

# Every command runs as: /bin/sh -c WRAPPER xcloud KEY COMMAND. POSIX sh (dash and
# busybox ash). It records "PID OOMCOUNT" in /tmp/.xcloud/KEY.pid (the exec is its own
# session and process-group leader, so PID is the group signal() targets; OOMCOUNT is
# the memory cgroup's oom_kill counter at start), starts in the directory the previous
# command ended in, evals the command in this shell (so a `cd` is seen by the EXIT
# trap) and on the way out saves the final directory and, if the OOM counter went up
# meanwhile, leaves /work/.xcloud/KEY.oom for the executor to find on the host. When
# the wrapper itself is SIGKILLed (exit status 137, no trap), wait() compares the
# counter from inside instead (POSTMORTEM_SCRIPT), so the pid file is kept for that.
WRAPPER = r"""__xc_k=$1 __xc_c=$2
shift 2
__xc_oom() {
  __xc_n=0
  for __xc_f in /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events; do
    if [ -r "$__xc_f" ]; then
      while read -r __xc_a __xc_b; do
        if [ "$__xc_a" = oom_kill ]; then __xc_n=$__xc_b; fi
      done < "$__xc_f"
    fi
  done
}
__xc_oom
__xc_o=$__xc_n
[ -d /tmp/.xcloud ] || mkdir -p /tmp/.xcloud
echo "$$ $__xc_o" > "/tmp/.xcloud/$__xc_k.pid"
__xc_w=/work
[ -r /work/.xcloud/cwd ] && IFS= read -r __xc_w < /work/.xcloud/cwd
cd "$__xc_w" 2>/dev/null || cd /work
trap '__xc_r=$?
{ [ -d /work/.xcloud ] || mkdir -p /work/.xcloud; pwd > /work/.xcloud/cwd
  __xc_oom; [ "$__xc_n" -gt "$__xc_o" ] && : > "/work/.xcloud/$__xc_k.oom"; } 2>/dev/null
if [ "$__xc_r" != 137 ] || [ -e "/work/.xcloud/$__xc_k.oom" ]; then
  rm -f "/tmp/.xcloud/$__xc_k.pid"
fi' EXIT
unset __xc_f __xc_a __xc_b __xc_w __xc_n
eval "$__xc_c"
"""

# /bin/sh -c SIGNAL_SCRIPT xcloud KEY SIGNAME: signal the command's process group. The
# pid file is written by the wrapper's first lines; the bounded wait covers a signal
# sent within milliseconds of start(). busybox's kill wants "-PGID", dash's "-- -PGID"
# (and rejects the former without sending anything).
SIGNAL_SCRIPT = r"""f=/tmp/.xcloud/$1.pid i=0
while [ ! -s "$f" ]; do
  i=$((i + 1)); [ "$i" -gt 300 ] && exit 3
  sleep 0.01
done
read -r p o < "$f"
kill -s "$2" "-$p" 2>/dev/null || kill -s "$2" -- "-$p"
"""

# /bin/sh -c POSTMORTEM_SCRIPT xcloud KEY: after an exit status of 137, print
# "OOM_AT_START OOM_NOW" ("-" when unknown) and drop the pid file.
POSTMORTEM_SCRIPT = r"""f=/tmp/.xcloud/$1.pid p=- o=- n=-
[ -r "$f" ] && read -r p o < "$f"
rm -f "$f"
for g in /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events; do
  if [ -r "$g" ]; then
    while read -r a b; do [ "$a" = oom_kill ] && n=$b; done < "$g"
  fi
done
echo "$o $n"
"""

# /bin/sh -c SIGNAL_ALL_SCRIPT xcloud SIGNAME: signal every command's process group in
# the container; prints how many. Used by close_session (TERM before the container
# goes) and recover (KILL: after a worker restart, the previous agent's commands can no
# longer report to anyone).
SIGNAL_ALL_SCRIPT = r"""n=0
for f in /tmp/.xcloud/*.pid; do
  [ -r "$f" ] || continue
  read -r p o < "$f" || continue
  { kill -s "$1" "-$p" || kill -s "$1" -- "-$p"; } 2>/dev/null && n=$((n + 1))
  if [ "$1" = KILL ]; then rm -f "$f"; fi
done
echo "$n"
"""

_NAME_OK = re.compile(r"[^A-Za-z0-9_.-]")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _safe_name(text: str) -> str:
    return _NAME_OK.sub("_", text) or "_"


def _task_key(task_id: str) -> str:
    """A file-name-safe, fixed-length key for a task id chosen by a client."""
    return hashlib.sha256(task_id.encode()).hexdigest()[:24]


def _parse_user(user: str) -> tuple[int, int] | None:
    """(uid, gid) of a numeric "uid[:gid]" user; None for names (resolved in the image)."""
    uid_s, _, gid_s = user.partition(":")
    if not uid_s.isdigit() or (gid_s and not gid_s.isdigit()):
        return None
    uid = int(uid_s)
    return uid, int(gid_s) if gid_s else uid


def _oom_count(text: str) -> int | None:
    return int(text) if text.isdigit() else None


@dataclass
class _Task:
    handle: TaskHandle
    key: str
    on_output: OutputSink
    stream: Iterator[tuple[bytes | None, bytes | None]] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: ExitResult | None = None
    signals: set[int] = field(default_factory=set)
    thread: threading.Thread | None = None


@dataclass
class _Session:
    handle: SessionHandle
    lock: threading.Lock = field(default_factory=threading.Lock)
    tasks: dict[str, _Task] = field(default_factory=dict)
    closing: bool = False

    @property
    def container_id(self) -> str:
        return self.handle.container_id or ""


class DockerExecutor(Executor):
    """Sessions are containers, tasks are execs. Thread-safe.

    ``worker_id`` labels every container (``xcloud.worker``) so that a restarted worker
    finds exactly its own leftovers; ``config`` supplies the image and limit defaults.
    ``client`` (a ``docker.DockerClient``) is for tests; by default one is made with
    ``docker.from_env()`` on first use. ``kill_grace_s``: how long close_session lets
    commands handle TERM before the container is removed.
    """

    name = "docker"

    def __init__(
        self,
        config: WorkerConfig | None = None,
        *,
        worker_id: str,
        client: docker.DockerClient | None = None,
        kill_grace_s: float = 5.0,
    ) -> None:
        if not worker_id:
            raise ExecutorError("the docker executor needs the worker id (for its labels)")
        self.config = config or WorkerConfig()
        self.worker_id = worker_id
        self.kill_grace_s = kill_grace_s
        self._client = client
        self._own_client = client is None
        self._client_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _sessions and _session_locks
        self._sessions: dict[str, _Session] = {}
        self._session_locks: dict[str, threading.Lock] = {}
        # Tasks of closed sessions, so a wait() racing close_session still gets its
        # result ("session closed"); bounded, oldest dropped first.
        self._closed_tasks: OrderedDict[tuple[str, str], _Task] = OrderedDict()

    # -- engine -------------------------------------------------------------------

    @property
    def client(self) -> docker.DockerClient:
        """The SDK client, created on first use (importing the SDK only then)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    try:
                        import docker

                        client = docker.from_env(timeout=60, max_pool_size=32)
                        client.ping()
                    except Exception as err:
                        raise ExecutorError(f"no docker engine answers: {err}") from err
                    self._client = client
        return self._client

    @property
    def user(self) -> str:
        """The in-container user: config ``docker_user``; empty = the worker's own ids."""
        configured = self.config.docker_user.strip()
        if configured:
            return configured
        uid, gid = os.getuid(), os.getgid()
        return DEFAULT_USER if uid == 0 else f"{uid}:{gid}"

    def capabilities(self) -> dict[str, Any]:
        base = {"name": self.name, "isolation": "container",
                "limits": ["cpus", "memory_bytes", "pids"], "stdin": False,
                "security_boundary": True, "network": self.config.docker_network,
                "default_image": self.config.docker_image,
                "image_override": self.config.docker_allow_image_override}
        try:
            version = self.client.version()
            images = self.client.api.images()
        except Exception as err:
            log.warning("docker capabilities: %s", err)
            return {**base, "engine": None, "api_version": None, "images": [],
                    "error": str(err)}
        tags = sorted(
            {t for img in images for t in (img.get("RepoTags") or []) if "<none>" not in t}
        )
        return {
            **base,
            "engine": version.get("Version"),
            "api_version": version.get("ApiVersion"),
            "images": tags,
        }

    def close(self) -> None:
        if self._client is not None and self._own_client:
            self._client.close()
        self._client = None

    # -- sessions -----------------------------------------------------------------

    def _session_lock(self, session_id: str) -> threading.Lock:
        with self._lock:
            return self._session_locks.setdefault(session_id, threading.Lock())

    def _labels(self, session_id: str, owner: str) -> dict[str, str]:
        return {
            LABEL_WORKER: self.worker_id,
            LABEL_SESSION: session_id,
            LABEL_OWNER: owner,
            LABEL_EXECUTOR: self.name,
        }

    def _find(self, session_id: str | None = None) -> list[dict[str, Any]]:
        """Summaries of this worker's containers (of one session when given)."""
        labels = [f"{LABEL_WORKER}={self.worker_id}"]
        if session_id is not None:
            labels.append(f"{LABEL_SESSION}={session_id}")
        try:
            return list(self.client.api.containers(all=True, filters={"label": labels}))
        except Exception as err:
            raise ExecutorError(f"cannot list containers: {err}") from err

    def _params(self, spec: SessionSpec) -> dict[str, Any]:
        """Everything needed to (re)create the session container, JSON-able."""
        cfg = self.config
        image = cfg.docker_image
        if spec.image and spec.image != image:
            if not cfg.docker_allow_image_override:
                raise ExecutorError(
                    f"this worker runs only its own image {image!r}; "
                    f"image {spec.image!r} is not allowed here"
                )
            image = spec.image
        limits = spec.limits or Limits()
        if spec.network and not cfg.docker_network:
            raise ExecutorError("this worker's owner does not allow network access")
        # The worker owner's settings are ceilings: a reservation may ask for less.
        memory = min(int(limits.memory_bytes or cfg.docker_memory_bytes),
                     int(cfg.docker_memory_bytes))
        cpus = min(float(limits.cpus or cfg.docker_cpus), float(cfg.docker_cpus))
        pids = min(int(limits.pids or cfg.docker_pids), int(cfg.docker_pids))
        return {
            "image": image,
            "network": "host" if spec.network else "none",
            "memory_bytes": memory,
            "cpus": cpus,
            "pids": pids,
            "user": self.user,
            "owner": spec.owner,
        }

    def _prepare_workdir(self, workdir: Path, user: str) -> str:
        """Let the container user write the bind-mounted work dir; returns how.

        As root we hand the directory to the container's uid (0700). As that very uid
        nothing is needed. Otherwise the directory is made 0777 (its parent, the
        worker's private state dir, still keeps other host users out) and
        close_session opens up what the container created, so the caller can delete it.
        """
        try:
            workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise ExecutorError(f"cannot create work dir {workdir}: {err}") from err
        ids = _parse_user(user)
        me = os.geteuid()
        state = workdir / ".xcloud"  # cwd file and OOM markers; see WRAPPER
        state.mkdir(exist_ok=True)
        if ids is not None and me == 0:
            for path in (workdir, state):
                os.chown(path, *ids)
                os.chmod(path, 0o700)
            return "chown"
        if ids is not None and me == ids[0]:
            return "own"
        # Ours, but open: the container's uid writes there, we can still delete.
        for path in (workdir, state):
            if stat.S_IMODE(path.stat().st_mode) != 0o777:
                os.chmod(path, 0o777)
        return "open"

    def _create(self, session_id: str, workdir: str, params: dict[str, Any]) -> str:
        """Create and start the session container; returns its id."""
        import docker.errors

        api = self.client.api
        image = params["image"]
        try:
            api.inspect_image(image)
        except docker.errors.ImageNotFound:
            raise ExecutorError(
                f"image {image!r} is not on this worker (images are never pulled here)"
            ) from None
        mem = int(params["memory_bytes"])
        tmp_size = max(TMPFS_MIN, min(TMPFS_MAX, mem // 2))
        host_config = api.create_host_config(
            binds={workdir: {"bind": WORK, "mode": "rw"}},
            network_mode=params["network"],
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={tmp_size},mode=1777"},
            mem_limit=mem,
            memswap_limit=mem,
            nano_cpus=int(float(params["cpus"]) * 1e9),
            pids_limit=int(params["pids"]),
            init=False,
        )
        name = f"xcloud-{_safe_name(self.worker_id)}-{_safe_name(session_id)}"[:200]
        kwargs: dict[str, Any] = {
            "entrypoint": ["/bin/sh", "-c", KEEPALIVE],
            "user": params["user"],
            "working_dir": WORK,
            "labels": self._labels(session_id, params["owner"]),
            "environment": {"HOME": WORK},
            "host_config": host_config,
            "name": name,
        }
        try:
            created = api.create_container(image, **kwargs)
        except docker.errors.APIError as err:
            if err.status_code != 409:
                raise ExecutorError(f"cannot create the session container: {err}") from err
            # A container of that name survived something (a crash mid-open): replace it.
            log.warning("replacing leftover container %s", name)
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(name, force=True)
            try:
                created = api.create_container(image, **kwargs)
            except docker.errors.APIError as err2:
                raise ExecutorError(f"cannot create the session container: {err2}") from err2
        cid = str(created["Id"])
        try:
            api.start(cid)
        except docker.errors.APIError as err:
            with contextlib.suppress(docker.errors.APIError):
                api.remove_container(cid, force=True)
            raise ExecutorError(f"cannot start the session container: {err}") from err
        log.info(
            "session %s: container %s (%s, network %s, %d MiB, %.2g cpus, %d pids)",
            session_id, cid[:12], image, params["network"], mem // (1024 * 1024),
            float(params["cpus"]), int(params["pids"]),
        )
        return cid

    def open_session(self, spec: SessionSpec) -> SessionHandle:
        """Create (or, for a session id already running here, reuse) its container."""
        params = self._params(spec)
        workdir = Path(spec.workdir)
        with self._session_lock(spec.session_id):
            with self._lock:
                known = self._sessions.get(spec.session_id)
            if known is not None and not known.closing and self._running(known.container_id):
                return known.handle
            how = self._prepare_workdir(workdir, params["user"])
            cid = ""
            for summary in self._find(spec.session_id):
                if summary.get("State") == "running" and not cid:
                    cid = str(summary["Id"])
                    log.info("session %s: reusing container %s", spec.session_id, cid[:12])
                else:
                    self._remove(str(summary["Id"]))
            if not cid:
                cid = self._create(spec.session_id, str(workdir), params)
            handle = SessionHandle(
                session_id=spec.session_id,
                executor=self.name,
                workdir=str(workdir),
                container_id=cid,
                extra={**params, "workdir_access": how, "recreated": 0},
            )
            with self._lock:
                self._sessions[spec.session_id] = _Session(handle)
            return handle

    def _running(self, cid: str) -> bool:
        import docker.errors

        if not cid:
            return False
        try:
            info = self.client.api.inspect_container(cid)
        except docker.errors.NotFound:
            return False
        return bool(info.get("State", {}).get("Running"))

    def _remove(self, cid: str) -> None:
        import docker.errors

        try:
            self.client.api.remove_container(cid, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as err:
            if err.status_code != 409:  # 409: removal already in progress
                raise ExecutorError(f"cannot remove container {cid[:12]}: {err}") from err

    def _adopt(self, handle: SessionHandle) -> _Session:
        """The internal state of a session handle (made on first use after a restart)."""
        with self._lock:
            sess = self._sessions.get(handle.session_id)
            if sess is None:
                if handle.executor != self.name:
                    raise ExecutorError(f"session {handle.session_id} is not a docker session")
                sess = _Session(handle)
                self._sessions[handle.session_id] = sess
            return sess

    def _recreate(self, sess: _Session, why: str) -> str:
        """Replace a dead session container (e.g. its PID 1 was OOM-killed)."""
        handle = sess.handle
        params: dict[str, Any] = {k: handle.extra[k] for k in
                  ("image", "network", "memory_bytes", "cpus", "pids", "user", "owner")
                  if k in handle.extra}
        if len(params) < 7:
            raise ExecutorError(f"session {handle.session_id}: container gone ({why}) and "
                                "the handle lacks what is needed to recreate it")
        old = handle.container_id or ""
        log.warning("session %s: container %s is %s; recreating it (the work dir is kept, "
                    "processes and /tmp are lost)", handle.session_id, old[:12], why)
        if old:
            self._remove(old)
        cid = self._create(handle.session_id, handle.workdir, params)
        handle.container_id = cid
        handle.extra["recreated"] = int(handle.extra.get("recreated", 0)) + 1
        return cid

    def _dead_reason(self, cid: str) -> str:
        import docker.errors

        try:
            state = self.client.api.inspect_container(cid).get("State", {})
        except docker.errors.NotFound:
            return "gone"
        if state.get("Running"):
            return ""
        if state.get("OOMKilled"):
            return "dead (its PID 1 was OOM-killed)"
        return f"dead (exit {state.get('ExitCode')})"

    def close_session(self, session: SessionHandle) -> None:
        """TERM the running commands, KILL what is left after the grace by removing the
        container (force). The host work dir is left to the caller."""
        with self._session_lock(session.session_id):
            with self._lock:
                sess = self._sessions.get(session.session_id)
            if sess is not None:
                sess.closing = True
            cid = (sess.container_id if sess else "") or session.container_id or ""
            running = [t for t in (sess.tasks.values() if sess else ()) if not t.done.is_set()]
            if running and cid:
                for task in running:
                    task.signals.add(_signal.SIGTERM)
                self._run(cid, ["/bin/sh", "-c", SIGNAL_ALL_SCRIPT, "xcloud", "TERM"],
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
            access = (sess.handle if sess else session).extra.get("workdir_access")
            if access == "open" and cid:
                # Files made by the container's uid: let the (other-uid) caller delete them.
                self._run(cid, ["chmod", "-R", "a+rwX", WORK], check=False)
            ids = {cid} if cid else set()
            ids.update(str(s["Id"]) for s in self._find(session.session_id))
            for container in ids:
                self._remove(container)
        for task in tasks:
            if task.thread is not None:
                task.thread.join(timeout=10)
        with self._lock:
            self._session_locks.pop(session.session_id, None)

    def recover(self, sessions: list[SessionHandle]) -> list[SessionHandle]:
        """The sessions whose containers still run; their stale commands are killed."""
        alive: list[SessionHandle] = []
        for handle in sessions:
            if handle.executor != self.name:
                continue
            running = [s for s in self._find(handle.session_id) if s.get("State") == "running"]
            if not running:
                continue
            handle.container_id = str(running[0]["Id"])
            out = self._run(handle.container_id,
                            ["/bin/sh", "-c", SIGNAL_ALL_SCRIPT, "xcloud", "KILL"],
                            check=False).strip()
            if out not in ("", "0"):
                log.info("session %s: killed %s command(s) left by the previous agent",
                         handle.session_id, out)
            with self._lock:
                self._sessions[handle.session_id] = _Session(handle)
            alive.append(handle)
        return alive

    def cleanup_orphans(self, keep: set[str]) -> int:
        """Remove this worker's containers whose session is not in ``keep``."""
        removed = 0
        for summary in self._find():
            session_id = (summary.get("Labels") or {}).get(LABEL_SESSION, "")
            if session_id in keep:
                continue
            self._remove(str(summary["Id"]))
            with self._lock:
                self._sessions.pop(session_id, None)
            removed += 1
            log.info("removed orphan container %s (session %s)", str(summary["Id"])[:12],
                     session_id or "?")
        return removed

    # -- tasks --------------------------------------------------------------------

    def _run(self, cid: str, cmd: list[str], *, check: bool = True) -> str:
        """Run a helper command in the container to completion; its stdout."""
        import docker.errors

        api = self.client.api
        try:
            exec_id = api.exec_create(cid, cmd, stdout=True, stderr=True, user=self.user,
                                      workdir=WORK)["Id"]
            out = api.exec_start(exec_id, demux=True)
            code = api.exec_inspect(exec_id).get("ExitCode")
        except docker.errors.APIError as err:
            if check:
                raise ExecutorError(f"exec in {cid[:12]} failed: {err}") from err
            log.debug("exec %s in %s failed: %s", cmd[:3], cid[:12], err)
            return ""
        stdout = (out[0] or b"").decode(errors="replace")
        if check and code != 0:
            stderr = (out[1] or b"").decode(errors="replace").strip()
            raise ExecutorError(f"exec {cmd[:3]} exited {code}: {stderr}")
        return stdout

    def _exec_create(self, sess: _Session, spec: TaskSpec, key: str) -> tuple[str, str]:
        """(container id, exec id); recreates a dead session container once."""
        import docker.errors

        api = self.client.api
        cmd = ["/bin/sh", "-c", WRAPPER, "xcloud", key, spec.command]
        for attempt in (1, 2):
            cid = sess.container_id
            try:
                if not cid:
                    raise docker.errors.NotFound("no container")
                created = api.exec_create(cid, cmd, stdout=True, stderr=True, stdin=False,
                                          user=self.user, workdir=WORK,
                                          environment=self._env(spec))
                return cid, str(created["Id"])
            except docker.errors.APIError as err:
                gone = isinstance(err, docker.errors.NotFound) or err.status_code == 409
                if not gone or attempt == 2:
                    raise ExecutorError(f"cannot start the command: {err}") from err
                self._recreate(sess, self._dead_reason(cid) if cid else "gone")
        raise AssertionError("unreachable")

    @staticmethod
    def _env(spec: TaskSpec) -> dict[str, str]:
        """The command's environment: the image's, HOME=/work, the task's, our markers."""
        env = {"TERM": "dumb"}
        for name, value in spec.env.items():
            if not _ENV_NAME.match(name) or "\0" in value:
                raise ExecutorError(f"invalid environment variable {name!r}")
            env[name] = value
        env.update({"XCLOUD_RESERVATION": spec.session.session_id,
                    "XCLOUD_EXEC_ID": spec.task_id})
        return env

    def start(self, spec: TaskSpec, on_output: OutputSink) -> TaskHandle:
        sess = self._adopt(spec.session)
        key = _task_key(spec.task_id)
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
                container_id=cid,
                exec_id=exec_id,
                started_at=time.time(),
            )
            task = _Task(handle, key, on_output)
            try:
                # Started here, not in the reader thread: once start() returns the
                # process exists, so a signal() right after it finds it.
                task.stream = self.client.api.exec_start(exec_id, stream=True, demux=True)
            except Exception as err:
                raise ExecutorError(f"cannot start the command: {err}") from err
            handle.pid = self._wait_started(exec_id)
            sess.tasks[spec.task_id] = task
        task.thread = threading.Thread(
            target=self._read, args=(sess, task, time.monotonic()),
            name=f"docker-exec-{spec.task_id}", daemon=True,
        )
        task.thread.start()
        # spec.timeout_s is the exec layer's to enforce (wait(timeout) then stop()), as
        # with the process executor: enforcing it here too would TERM the group twice.
        return handle

    def _wait_started(self, exec_id: str) -> int | None:
        """The exec's host pid, once the engine has started it (None if unknown).

        exec_start answers before runc has spawned the process (tens of milliseconds
        later on a busy machine). Waiting here means that when start() returns the
        command really runs, so exec.started can carry its pid and a signal() sent
        right away finds it. The engine offers no notification: poll, backing off.
        """
        api = self.client.api
        delay = 0.001
        deadline = time.monotonic() + PID_WAIT_S
        while True:
            try:
                info = api.exec_inspect(exec_id)
            except Exception as err:
                log.debug("exec_inspect %s: %s", exec_id[:12], err)
                return None
            pid = int(info.get("Pid") or 0)
            if pid or info.get("ExitCode") is not None:
                return pid or None
            if time.monotonic() >= deadline:
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _read(self, sess: _Session, task: _Task, t0: float) -> None:
        """Reader thread: forward output, then work out how the command ended."""
        error: str | None = None
        try:
            assert task.stream is not None
            for out, err in task.stream:
                for name, data in (("stdout", out), ("stderr", err)):
                    if not data:
                        continue
                    try:
                        task.on_output(name, data)
                    except Exception:
                        log.exception("output sink of task %s failed", task.handle.task_id)
        except Exception as exc:  # the container went away under the stream
            error = f"output stream broken: {exc}"
        duration = time.monotonic() - t0
        try:
            result = self._exit_result(sess, task, duration, error)
        except Exception as exc:
            log.exception("task %s: cannot determine its exit", task.handle.task_id)
            result = ExitResult(exit_code=None, duration_s=duration, error=str(exc))
        task.result = result
        task.done.set()

    def _exit_code(self, exec_id: str) -> int | None:
        """The exec's exit code; None if the engine no longer knows it."""
        import docker.errors

        api = self.client.api
        # The engine records the exit before it closes the stream, so this normally
        # answers at once; the short bounded retry only guards against engines that
        # do not.
        for delay in (0.0, 0.005, 0.02, 0.05, 0.1, 0.2):
            if delay:
                time.sleep(delay)
            try:
                info = api.exec_inspect(exec_id)
            except docker.errors.NotFound:
                return None
            if not info.get("Running"):
                code = info.get("ExitCode")
                return int(code) if code is not None else None
        return None

    def _exit_result(
        self, sess: _Session, task: _Task, duration: float, error: str | None
    ) -> ExitResult:
        import docker.errors

        assert task.handle.exec_id is not None
        code = self._exit_code(task.handle.exec_id)
        cid = task.handle.container_id or ""
        killed = code is None or code == 128 + _signal.SIGKILL
        if sess.closing and killed:
            return ExitResult(exit_code=None, signal=int(_signal.SIGKILL), duration_s=duration,
                              error="session closed")
        if code is None:
            reason = self._dead_reason(cid)
            return ExitResult(exit_code=None, signal=int(_signal.SIGKILL), duration_s=duration,
                              oom_killed="OOM" in reason,
                              error=error or f"session container {reason or 'lost'}")
        oom = self._take_oom_marker(sess, task)
        if code == 128 + _signal.SIGKILL and not oom:
            # Killed by SIGKILL: by us, or by the kernel's OOM killer in the container's
            # memory cgroup? The wrapper noted the cgroup's oom_kill count at start.
            try:
                at_start, now = self._run(
                    cid, ["/bin/sh", "-c", POSTMORTEM_SCRIPT, "xcloud", task.key]
                ).split()[:2]
                before, after = _oom_count(at_start), _oom_count(now)
                oom = before is not None and after is not None and after > before
            except (ExecutorError, ValueError, docker.errors.APIError):
                # The container itself may have died (its PID 1 OOM-killed).
                oom = "OOM" in self._dead_reason(cid)
        if oom:
            log.info("task %s: the OOM killer struck (limit %s bytes, exit %s)",
                     task.handle.task_id, sess.handle.extra.get("memory_bytes"), code)
            if code == 128 + _signal.SIGKILL:
                return ExitResult(exit_code=None, signal=int(_signal.SIGKILL),
                                  duration_s=duration, oom_killed=True,
                                  error=error)
            # The command survived losing a process (`hog | tee log`): still worth saying.
            return ExitResult(exit_code=code, duration_s=duration, oom_killed=True, error=error)
        # The engine reports a death by signal N as 128+N; a command may also exit
        # 128+N itself. Report a signal only when we sent that one.
        if code > 128 and (code - 128) in task.signals:
            return ExitResult(exit_code=None, signal=code - 128, duration_s=duration,
                              error=error)
        return ExitResult(exit_code=code, duration_s=duration, error=error)

    @staticmethod
    def _take_oom_marker(sess: _Session, task: _Task) -> bool:
        """Did the wrapper's EXIT trap see the OOM counter go up? (Consumes the marker.)"""
        marker = Path(sess.handle.workdir) / ".xcloud" / f"{task.key}.oom"
        try:
            marker.unlink()
        except FileNotFoundError:
            return False
        except OSError:
            return marker.exists()
        return True

    def _task(self, handle: TaskHandle) -> _Task:
        with self._lock:
            sess = self._sessions.get(handle.session_id)
            task = sess.tasks.get(handle.task_id) if sess else None
            if task is None:
                task = self._closed_tasks.get((handle.session_id, handle.task_id))
        if task is None:
            raise ExecutorError(f"unknown task {handle.task_id} (session {handle.session_id})")
        return task

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
        cid = task.handle.container_id or ""
        try:
            self._run(cid, ["/bin/sh", "-c", SIGNAL_SCRIPT, "xcloud", task.key, name])
        except ExecutorError as err:
            if task.done.is_set():  # it ended meanwhile: nothing left to signal
                return
            raise ExecutorError(f"cannot signal task {handle.task_id}: {err}") from err
