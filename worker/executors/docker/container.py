"""The session containers of one worker: how they are made (hardened), found, run in and
removed, through the engine's low-level API.

Every session container is hardened the same way (see docs/docker.md): network mode
``none`` (``host`` only when both the worker owner and the reservation allow a network),
all capabilities dropped, ``no-new-privileges``, a non-root user, a read-only root file
system with a size-limited tmpfs on ``/tmp``, and memory (no swap), CPU and pids limits.
Each is labelled with the worker's id so that a restarted worker finds exactly its own,
and with its state dir so that whoever started the worker (``xcloud up``) can sweep what
it left (``remove_labelled``).

The docker SDK is imported on first use, not at import time: the idle agent must stay
small unless this executor is actually selected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.config import WorkerConfig
from worker.executors.base import ExecutorError, Limits, SessionSpec

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)

LABEL_WORKER = "xcloud.worker"
LABEL_SESSION = "xcloud.session"
LABEL_OWNER = "xcloud.owner"
LABEL_EXECUTOR = "xcloud.executor"
LABEL_STATE_DIR = "xcloud.state_dir"

WORK = "/work"
TMPFS_MIN = 16 * 1024 * 1024
TMPFS_MAX = 1024 * 1024 * 1024
DEFAULT_USER = "1000:1000"

# PID 1 of a session container. tini when the image has it; otherwise a shell whose
# `wait` reaps the orphans that commands leave behind (a bare `sleep` as PID 1 would
# leave them as zombies, eating into the pids limit) and that exits on TERM.
KEEPALIVE = (
    "command -v tini >/dev/null 2>&1 && exec tini -s -- sleep 2147483647; "
    'trap "exit 0" TERM; while :; do sleep 2147483647 & wait; done'
)

_NAME_OK = re.compile(r"[^A-Za-z0-9_.-]")


def safe_name(text: str) -> str:
    return _NAME_OK.sub("_", text) or "_"


def parse_user(user: str) -> tuple[int, int] | None:
    """(uid, gid) of a numeric "uid[:gid]" user; None for names (resolved in the image)."""
    uid_s, _, gid_s = user.partition(":")
    if not uid_s.isdigit() or (gid_s and not gid_s.isdigit()):
        return None
    uid = int(uid_s)
    return uid, int(gid_s) if gid_s else uid


@dataclass(frozen=True)
class ContainerParams:
    """Everything needed to (re)create a session container; kept in the session's
    driver state so a dead container can be recreated the same."""

    image: str
    network: str  # "none" | "host"
    memory_bytes: int
    cpus: float
    pids: int
    user: str
    owner: str
    gpus: tuple[str, ...] = ()  # device ids for an NVIDIA device request (docs/gpus.md)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ContainerParams | None:
        """The parameters in ``data``; None when they are incomplete or malformed."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(image=str(data["image"]), network=str(data["network"]),
                       memory_bytes=int(data["memory_bytes"]), cpus=float(data["cpus"]),
                       pids=int(data["pids"]), user=str(data["user"]),
                       owner=str(data["owner"]),
                       gpus=tuple(str(g) for g in data.get("gpus") or ()))
        except (KeyError, TypeError, ValueError):
            return None


def gpu_request(device_ids: tuple[str, ...]) -> dict[str, Any]:
    """The host-config arguments that hand these GPUs to a container (NVIDIA's container
    toolkit maps them); nothing for none. The session spec's ``gpu_devices``
    (worker/job_gpus.py ``GpuSessionSpec``) names them."""
    if not device_ids:
        return {}
    from docker.types import DeviceRequest

    return {"device_requests": [DeviceRequest(driver="nvidia", device_ids=list(device_ids),
                                              capabilities=[["gpu"]])]}


class Containers:
    """This worker's session containers on the local engine. Thread-safe.

    ``client`` (a ``docker.DockerClient``) is for tests; by default one is made with
    ``docker.from_env()`` on first use.
    """

    def __init__(self, config: WorkerConfig, worker_id: str,
                 client: docker.DockerClient | None = None,
                 state_dir: Path | str | None = None) -> None:
        self.config = config
        self.worker_id = worker_id
        self.state_dir = str(Path(state_dir).resolve()) if state_dir is not None else None
        self._client = client
        self._own_client = client is None
        self._client_lock = threading.Lock()

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

    def close(self) -> None:
        if self._client is not None and self._own_client:
            self._client.close()
        self._client = None

    @property
    def user(self) -> str:
        """The in-container user: config ``docker_user``; empty = the worker's own ids."""
        configured = self.config.docker_user.strip()
        if configured:
            return configured
        uid, gid = os.getuid(), os.getgid()
        return DEFAULT_USER if uid == 0 else f"{uid}:{gid}"

    def labels(self, session_id: str, owner: str) -> dict[str, str]:
        labels = {
            LABEL_WORKER: self.worker_id,
            LABEL_SESSION: session_id,
            LABEL_OWNER: owner,
            LABEL_EXECUTOR: "docker",
        }
        if self.state_dir is not None:
            labels[LABEL_STATE_DIR] = self.state_dir
        return labels

    def find(self, session_id: str | None = None) -> list[dict[str, Any]]:
        """Summaries of this worker's containers (of one session when given). With a
        state dir, only those it labelled: two grids' workers may share an id and an
        engine (a test grid beside a real one), and must not take each other's
        containers for orphans."""
        labels = [f"{LABEL_WORKER}={self.worker_id}"]
        if self.state_dir is not None:
            labels.append(f"{LABEL_STATE_DIR}={self.state_dir}")
        if session_id is not None:
            labels.append(f"{LABEL_SESSION}={session_id}")
        try:
            return list(self.client.api.containers(all=True, filters={"label": labels}))
        except Exception as err:
            raise ExecutorError(f"cannot list containers: {err}") from err

    # -- making one ---------------------------------------------------------------

    def params(self, spec: SessionSpec) -> ContainerParams:
        """The container a session asks for, within what the worker's owner allows."""
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
        return ContainerParams(image=image, network="host" if spec.network else "none",
                               memory_bytes=memory, cpus=cpus, pids=pids, user=self.user,
                               owner=spec.owner,
                               gpus=tuple(getattr(spec, "gpu_devices", None) or ()))

    @staticmethod
    def prepare_workdir(workdir: Path, user: str) -> str:
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
        ids = parse_user(user)
        me = os.geteuid()
        state = workdir / ".xcloud"  # cwd file and OOM markers; see wrapper.WRAPPER
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

    def create(self, session_id: str, workdir: str, params: ContainerParams) -> str:
        """Create and start the session container; returns its id."""
        import docker.errors

        api = self.client.api
        image = params.image
        try:
            api.inspect_image(image)
        except docker.errors.ImageNotFound:
            raise ExecutorError(
                f"image {image!r} is not on this worker (images are never pulled here)"
            ) from None
        mem = params.memory_bytes
        tmp_size = max(TMPFS_MIN, min(TMPFS_MAX, mem // 2))
        host_config = api.create_host_config(
            binds={workdir: {"bind": WORK, "mode": "rw"}},
            network_mode=params.network,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={tmp_size},mode=1777"},
            mem_limit=mem,
            memswap_limit=mem,
            nano_cpus=int(params.cpus * 1e9),
            pids_limit=params.pids,
            init=False,
            **gpu_request(params.gpus),
        )
        name = f"xcloud-{safe_name(self.worker_id)}-{safe_name(session_id)}"[:200]
        kwargs: dict[str, Any] = {
            "entrypoint": ["/bin/sh", "-c", KEEPALIVE],
            "user": params.user,
            "working_dir": WORK,
            "labels": self.labels(session_id, params.owner),
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
            session_id, cid[:12], image, params.network, mem // (1024 * 1024),
            params.cpus, params.pids,
        )
        return cid

    # -- its state ----------------------------------------------------------------

    def running(self, cid: str) -> bool:
        import docker.errors

        if not cid:
            return False
        try:
            info = self.client.api.inspect_container(cid)
        except docker.errors.NotFound:
            return False
        return bool(info.get("State", {}).get("Running"))

    def dead_reason(self, cid: str) -> str:
        """Why container ``cid`` does not run ("" while it does)."""
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

    def remove(self, cid: str) -> None:
        """Force-remove container ``cid`` (killing what runs in it); gone is fine."""
        import docker.errors

        try:
            self.client.api.remove_container(cid, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as err:
            if err.status_code != 409:  # 409: removal already in progress
                raise ExecutorError(f"cannot remove container {cid[:12]}: {err}") from err

    def run(self, cid: str, cmd: list[str], *, check: bool = True) -> str:
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


def remove_labelled(labels: dict[str, str], client: docker.DockerClient | None = None
                    ) -> list[str]:
    """Force-remove every container (running or not) carrying all of ``labels``; their
    names. For whoever started workers and outlives them (``xcloud up``): what a worker
    could not remove itself (it was killed) goes at the end. ExecutorError when no
    engine answers."""
    own = client is None
    try:
        if client is None:
            import docker

            client = docker.from_env(timeout=60)
        found = client.api.containers(
            all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})
    except Exception as err:
        raise ExecutorError(f"cannot list containers: {err}") from err
    removed: list[str] = []
    try:
        for summary in found:
            name = ((summary.get("Names") or ["?"])[0]).lstrip("/")
            try:
                client.api.remove_container(str(summary["Id"]), force=True)
                removed.append(name)
            except Exception as err:  # gone meanwhile, or being removed: not ours to fix
                log.warning("cannot remove container %s: %s", name, err)
    finally:
        if own:
            client.close()
    return removed
