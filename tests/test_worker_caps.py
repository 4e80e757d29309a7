"""Worker capability document, metrics sampling and Docker probe (identity storage:
tests/test_worker_identity.py)."""

from __future__ import annotations

import json
import os
import platform
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from broker.config import WorkerConfig
from schemas.codec import decode, encode, envelope
from schemas.errors import WireError
from schemas.messages import WorkerCaps, WorkerHeartbeat
from tests.fixtures.services import require_service
from worker.caps import collect_caps
from worker.executors.base import EngineInfo
from worker.executors.docker.fingerprint import DEFAULT_SOCKET, docker_capabilities, probe_docker
from worker.executors.process import ProcessExecutor
from worker.metrics import MetricsSampler

NO_DOCKER: dict[str, Any] = {"available": False, "version": None, "api_version": None, "images": []}
PROCESS = ProcessExecutor.fingerprint(WorkerConfig())


def roundtrip(body: WorkerCaps | WorkerHeartbeat) -> object:
    """Encode (validating against the schema) and decode again, as a peer would."""
    return decode(encode(envelope(body))).body


# --------------------------------------------------------------------------- caps


def test_caps_are_valid_and_sensible(tmp_path: Path) -> None:
    cfg = WorkerConfig(
        name="lab-7",
        description="spare desktop in room 7",
        tags=["gpu", " ", "linux"],
        slots=3,
        heartbeat_s=5.0,
        shared_apps=["blast"],
        shared_packages=["numpy"],
        shared_data=["hg38"],
    )
    docker = docker_capabilities(cfg, engine=EngineInfo())
    caps = collect_caps("w1", cfg, tmp_path, [PROCESS, docker], "0.1.0", docker=NO_DOCKER)
    assert roundtrip(caps) == caps
    assert caps.wid == "w1"
    assert caps.name == "lab-7"
    assert caps.description == "spare desktop in room 7"
    assert caps.tags == ["gpu", "linux"]
    assert caps.slots == 3
    assert caps.executors == ["process", "docker"]
    assert caps.cpu["count"] == os.cpu_count()
    physical = psutil.cpu_count(logical=False)
    assert caps.cpu["physical"] == physical
    assert caps.cpu["model"]
    assert caps.memory_bytes == psutil.virtual_memory().total
    usage = psutil.disk_usage(str(tmp_path))
    assert caps.disk_total_bytes == usage.total
    assert caps.disk_free_bytes is not None
    assert caps.disk_free_bytes > 0
    assert caps.host["hostname"] == socket.gethostname()
    assert caps.host["os"] == platform.system().lower()
    assert caps.host["arch"] == platform.machine()
    assert caps.host["python"] == platform.python_version()
    assert caps.host["os_release"]
    assert caps.shared == {"apps": ["blast"], "packages": ["numpy"], "data": ["hg38"]}
    assert caps.heartbeat_s == 5.0
    assert caps.agent_version == "0.1.0"
    assert caps.docker == NO_DOCKER


def test_caps_defaults_name_to_hostname_and_state_dir_may_not_exist(tmp_path: Path) -> None:
    caps = collect_caps("w2", WorkerConfig(), tmp_path / "not" / "yet", [PROCESS], "0.1.0",
                        docker=NO_DOCKER)
    assert caps.name == socket.gethostname()[:128]
    assert caps.description is None
    assert caps.disk_total_bytes == psutil.disk_usage(str(tmp_path)).total
    roundtrip(caps)


def test_caps_with_the_real_docker_probe_validate(tmp_path: Path) -> None:
    caps = collect_caps("w3", WorkerConfig(), tmp_path, [PROCESS], "0.1.0")
    assert caps.docker is not None
    assert isinstance(caps.docker["available"], bool)
    roundtrip(caps)


def test_caps_take_the_engine_from_the_docker_fingerprint(tmp_path: Path) -> None:
    engine = EngineInfo(available=True, version="24.0.7", api_version="1.43",
                        images=("busybox:latest",))
    docker = docker_capabilities(WorkerConfig(), engine=engine)
    assert docker.available
    assert docker.engine is not None
    assert docker.engine.images == engine.images
    caps = collect_caps("w4", WorkerConfig(), tmp_path, [PROCESS, docker], "0.1.0")
    assert caps.executors == ["process", "docker"]
    assert caps.docker == {"available": True, "version": "24.0.7", "api_version": "1.43",
                           "images": ["busybox:latest"], "image_override": True,
                           "default_image": WorkerConfig().docker_image}
    roundtrip(caps)
    absent = docker_capabilities(WorkerConfig(), engine=EngineInfo())
    assert not absent.available
    assert absent.error


def test_invalid_config_is_caught_by_the_schema(tmp_path: Path) -> None:
    caps = collect_caps("w1", WorkerConfig(tags=["x" * 65]), tmp_path, [PROCESS], "0.1.0",
                        docker=NO_DOCKER)
    with pytest.raises(WireError):
        encode(envelope(caps))


# ------------------------------------------------------------------------ metrics


def test_heartbeat_sample_is_valid(tmp_path: Path) -> None:
    sampler = MetricsSampler("w1", tmp_path)
    sum(range(200_000))  # some CPU between the two readings
    beat = sampler.sample(7, 0.5, 2, [{"kind": "exec", "id": "j1"}])
    assert roundtrip(beat) == beat
    assert beat.seq == 7
    assert beat.interval_s == 0.5
    assert beat.free_slots == 2
    assert beat.running == [{"kind": "exec", "id": "j1"}]
    assert 0.0 <= beat.cpu_percent <= 100.0
    assert beat.mem_used_bytes > 0
    assert beat.mem_available_bytes is not None
    assert beat.mem_available_bytes > 0
    assert beat.disk_free_bytes is not None
    assert beat.disk_free_bytes > 0
    assert beat.load1 is not None
    assert beat.load1 >= 0
    assert beat.net_sent_bytes is not None
    assert beat.net_recv_bytes is not None
    again = sampler.sample(8, 0.5, -1)
    assert again.free_slots == 0
    assert again.running == []
    roundtrip(again)


# -------------------------------------------------------------------- docker probe


Responder = Callable[[str], bytes]


def _ok_json(payload: object, chunked: bool = False) -> bytes:
    body = json.dumps(payload).encode()
    if not chunked:
        return b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body
    half = len(body) // 2
    chunks = b"".join(
        f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:half], body[half:])
    )
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")


@pytest.fixture
def fake_engine(tmp_path: Path) -> Iterator[Callable[[Responder], str]]:
    """A unix-socket HTTP server answering like a Docker engine; yields its DOCKER_HOST."""
    servers: list[socketserver.UnixStreamServer] = []
    threads: list[threading.Thread] = []

    def start(respond: Responder) -> str:
        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request_line = self.rfile.readline().decode()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                self.wfile.write(respond(request_line.split()[1]))

        path = tmp_path / f"docker-{len(servers)}.sock"
        server = socketserver.UnixStreamServer(str(path), Handler)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        servers.append(server)
        threads.append(thread)
        return f"unix://{path}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join(5)


def test_docker_probe_reads_version_and_images(
    fake_engine: Callable[[Responder], str],
) -> None:
    def respond(path: str) -> bytes:
        if path == "/version":
            return _ok_json({"Version": "20.10.24", "ApiVersion": "1.41"})
        if path == "/images/json":
            return _ok_json(
                [
                    {"RepoTags": ["busybox:latest", "xcloud-base:bookworm"]},
                    {"RepoTags": ["<none>:<none>"]},
                    {"RepoTags": None},
                    {"RepoTags": ["busybox:latest"]},
                ],
                chunked=True,
            )
        return b"HTTP/1.0 404 Not Found\r\n\r\n"

    result = probe_docker(fake_engine(respond))
    assert result == {
        "available": True,
        "version": "20.10.24",
        "api_version": "1.41",
        "images": ["busybox:latest", "xcloud-base:bookworm"],
    }


def test_docker_probe_never_raises(tmp_path: Path, fake_engine: Callable[[Responder], str]
                                   ) -> None:
    assert probe_docker(f"unix://{tmp_path}/missing.sock") == NO_DOCKER
    assert probe_docker("ssh://user@host") == NO_DOCKER
    assert probe_docker(fake_engine(lambda _p: b"HTTP/1.0 500 Oops\r\n\r\n")) == NO_DOCKER
    assert probe_docker(fake_engine(lambda _p: b"garbage")) == NO_DOCKER
    assert probe_docker(fake_engine(lambda _p: _ok_json([1, 2]))) == NO_DOCKER
    # a closed TCP port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert probe_docker(f"tcp://127.0.0.1:{port}") == NO_DOCKER


def test_docker_probe_times_out_on_a_silent_engine(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)
        assert probe_docker(f"unix://{path}", timeout=0.2) == NO_DOCKER


def test_docker_probe_of_the_real_engine_matches_the_schema() -> None:
    if not os.path.exists(DEFAULT_SOCKET):
        require_service("docker", f"no Docker socket at {DEFAULT_SOCKET}")
    result = probe_docker(f"unix://{DEFAULT_SOCKET}")
    if result["available"]:
        assert result["version"]
        assert result["api_version"]
        assert all("<none>" not in tag for tag in result["images"])
