"""The docker driver's fingerprint: is an engine answering, and which images does it hold?

Deliberately does not import the docker SDK: it pulls in requests and urllib3, and the
idle agent must stay small (< 50 MB RSS). Two HTTP/1.0 GETs over the engine's socket
(``/version`` and ``/images/json``) are all the capability document needs. The worker
probes the engine even when it runs only the process driver: worker.caps' ``docker``
object describes the machine.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from broker.config import WorkerConfig
from worker.executors.base import EngineInfo, ExecutorCapabilities

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/run/docker.sock"
DEFAULT_TIMEOUT_S = 1.0
MAX_RESPONSE = 8 * 1024 * 1024
MAX_IMAGES = 1024
MAX_TAG_LEN = 256


class _ProbeError(Exception):
    pass


def _endpoint(docker_host: str | None) -> tuple[int, Any]:
    """(address family, address) from DOCKER_HOST; unix sockets and plain tcp only."""
    if not docker_host:
        return socket.AF_UNIX, DEFAULT_SOCKET
    parsed = urlparse(docker_host)
    if parsed.scheme == "unix":
        return socket.AF_UNIX, parsed.path or DEFAULT_SOCKET
    if parsed.scheme == "tcp" and parsed.hostname:
        if os.environ.get("DOCKER_TLS_VERIFY"):
            raise _ProbeError("TLS-protected engines are not probed")
        return socket.AF_INET, (parsed.hostname, parsed.port or 2375)
    raise _ProbeError(f"unsupported DOCKER_HOST {docker_host!r}")


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def _get(family: int, address: Any, path: str, timeout: float) -> Any:
    """One HTTP/1.0 GET; the engine closes the connection after answering."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
        data = bytearray()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_RESPONSE:
                raise _ProbeError(f"response to {path} too large")
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        raise _ProbeError(f"malformed response to {path}")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split()
    if len(status) < 2 or status[1] != "200":
        raise _ProbeError(f"{path}: {lines[0]}")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return json.loads(body)


def probe_docker(
    docker_host: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    """The schema's ``docker`` object: {available, version, api_version, images}. Never raises.

    ``docker_host`` defaults to ``$DOCKER_HOST``, then ``/var/run/docker.sock``.
    """
    return probe_engine(docker_host, timeout=timeout).to_wire()


def probe_engine(
    docker_host: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S
) -> EngineInfo:
    """The local engine as ``EngineInfo``; ``available`` False when none answers."""
    result: dict[str, Any] = {"available": False, "version": None, "api_version": None,
                              "images": []}
    host = docker_host if docker_host is not None else os.environ.get("DOCKER_HOST")
    try:
        family, address = _endpoint(host)
        if family == socket.AF_UNIX and not os.path.exists(address):
            return EngineInfo()
        version = _get(family, address, "/version", timeout)
        if not isinstance(version, dict):
            raise _ProbeError("unexpected /version answer")
        result["available"] = True
        result["version"] = str(version["Version"]) if version.get("Version") else None
        result["api_version"] = (
            str(version["ApiVersion"]) if version.get("ApiVersion") else None
        )
        images = _get(family, address, "/images/json", timeout)
        tags: set[str] = set()
        for image in images if isinstance(images, list) else []:
            for tag in (image.get("RepoTags") or []) if isinstance(image, dict) else []:
                if isinstance(tag, str) and "<none>" not in tag and len(tag) <= MAX_TAG_LEN:
                    tags.add(tag)
        result["images"] = sorted(tags)[:MAX_IMAGES]
    except Exception as err:  # never raise: no engine simply means no docker executor
        log.debug("docker probe of %s: %s", host or DEFAULT_SOCKET, err)
    return EngineInfo(available=bool(result["available"]), version=result["version"],
                      api_version=result["api_version"], images=tuple(result["images"]))


def _wire_image(image: str) -> str | None:
    """The image as the caps schema bounds it (printable ASCII, MAX_TAG_LEN), else None:
    the coordinator then lets no named image through to a worker without override."""
    if image and len(image) <= MAX_TAG_LEN and all(" " <= c <= "~" for c in image):
        return image
    return None


@dataclass(frozen=True)
class ConfiguredEngine(EngineInfo):
    """The engine with the owner's image policy, so worker.caps' ``docker`` object says
    it: a worker that runs only its own image (``docker_allow_image_override`` false)
    would fail every job or reservation naming another, and the coordinator's matching
    (coordinator/job_matching.py, coordinator/matching.py) keeps those away from it."""

    image_override: bool = True
    default_image: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {**super().to_wire(), "image_override": self.image_override,
                "default_image": self.default_image}


def docker_capabilities(config: WorkerConfig, engine: EngineInfo | None = None
                        ) -> ExecutorCapabilities:
    """What the docker driver offers here: containers, its limits, the worker owner's
    image and network choices, and the engine (``engine`` skips the probe) with the
    image policy."""
    probed = engine if engine is not None else probe_engine()
    engine = ConfiguredEngine(
        available=probed.available, version=probed.version, api_version=probed.api_version,
        images=probed.images, image_override=config.docker_allow_image_override,
        default_image=_wire_image(config.docker_image))
    return ExecutorCapabilities(
        name="docker", isolation="container", security_boundary=True,
        limits=frozenset({"cpus", "memory_bytes", "pids"}), stdin=True, tty=True,
        network=config.docker_network, gpus="devices", default_image=config.docker_image,
        image_override=config.docker_allow_image_override, engine=engine,
        error=None if engine.available else "no docker engine answers",
    )
