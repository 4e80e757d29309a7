"""xcloud's own images (scripts/build-images) and the compose file (docker/compose.yaml).

A worker in its own container (``--network host``) joins a broker and coordinator that
run in this test process on 127.0.0.1; the client image lists it. Building the images
the first time takes about a minute (wheelhouse + pip install); afterwards the build
script finds them up to date by their source hash and returns in about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from broker.config import Config
from broker.embedded import BrokerSettings, EmbeddedBroker
from coordinator.auth import store_authenticator
from coordinator.bootstrap import issue_token
from coordinator.service import Coordinator
from coordinator.store import Store
from tests.fixtures.services import require_service, wait_for

if TYPE_CHECKING:
    from docker.models.containers import Container

    import docker

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
BASE = "xcloud-base:bookworm"
IMAGES = ("xcloud-worker:latest", "xcloud-coordinator:latest", "xcloud-client:latest")
TEST_LABEL = "xcloud.test"
RUN_ID = uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def images(docker_engine: docker.DockerClient,
           docker_image: Callable[[str], str]) -> dict[str, str]:
    """Build (or find up to date) the three images; name -> source hash label."""
    docker_image(BASE)
    env = dict(os.environ, XCLOUD_IMAGE_BASE=BASE)
    env.setdefault("XCLOUD_PYTHON", sys.executable)  # the same 3.11 the tests run on
    proc = subprocess.run(["bash", "scripts/build-images"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=840, check=False)
    assert proc.returncode == 0, f"scripts/build-images failed:\n{proc.stderr[-3000:]}"
    built = {}
    for name in IMAGES:
        labels = docker_engine.images.get(name).labels or {}
        assert labels.get("org.xcloud.source"), f"{name} lacks its source hash label"
        built[name] = labels["org.xcloud.source"]
    assert len(set(built.values())) == 1  # all three from the same sources
    return built


@pytest.fixture(scope="module")
def leak_check(docker_engine: docker.DockerClient) -> Iterator[None]:
    yield
    leftovers = docker_engine.containers.list(
        all=True, filters={"label": f"{TEST_LABEL}=images-{RUN_ID}"})
    for container in leftovers:
        container.remove(force=True)
    assert not leftovers, f"containers left behind: {[c.name for c in leftovers]}"


@dataclass
class HostGrid:
    store: Store
    broker: EmbeddedBroker
    coordinator: Coordinator
    config: Config

    def token(self, principal: str, role: str) -> str:
        return issue_token(self.store, principal, role, "test_docker_images")

    def env(self, principal: str, token: str) -> dict[str, str]:
        """What a container needs to join this grid (it shares the host's network)."""
        return {
            "XCLOUD_BUS_URL": self.broker.url,
            "XCLOUD_BUS_ROOT": self.config.bus.root,
            "XCLOUD_BUS_PRINCIPAL": principal,
            "XCLOUD_BUS_TOKEN": token,
        }


@pytest.fixture
def host_grid(tmp_path: Path) -> Iterator[HostGrid]:
    """Broker + coordinator in this process, wired as ``xcloud up`` does."""
    store = Store.open(f"sqlite:///{tmp_path}/xcloud.db")
    root = f"t{RUN_ID}"
    broker = EmbeddedBroker(BrokerSettings(port=0, root=root), store_authenticator(store))
    broker.start_in_thread()
    config = Config(home=tmp_path / "home")
    config.bus.url = broker.url
    config.bus.root = root
    config.bus.principal = "coordinator"
    config.bus.token = issue_token(store, "coordinator", "coordinator")
    config.coordinator.default_heartbeat_s = 0.5
    coordinator = Coordinator(config, store)
    coordinator.start()
    try:
        yield HostGrid(store, broker, coordinator, config)
    finally:
        coordinator.stop()
        broker.stop_in_thread()
        store.close()


def run_container(engine: docker.DockerClient, image: str, command: list[str],
                  env: dict[str, str], **kw: Any) -> Container:
    """A detached container on the host network, hardened like everything we run."""
    return engine.containers.run(
        image, command, environment=env, network_mode="host", detach=True, init=True,
        cap_drop=["ALL"], security_opt=["no-new-privileges"],
        labels={TEST_LABEL: f"images-{RUN_ID}"}, **kw)


def worker_state(grid: HostGrid, wid: str) -> str | None:
    record = grid.store.get_worker(wid)
    return record.state.value if record else None


@pytest.mark.usefixtures("images")
def test_images_are_built_and_cached() -> None:
    """Run again: every image is found up to date and nothing is rebuilt.

    (Twice at most: in a work tree being edited, the sources may change between the
    fixture's build and this run.)
    """
    env = dict(os.environ, XCLOUD_IMAGE_BASE=BASE)
    env.setdefault("XCLOUD_PYTHON", sys.executable)
    for _ in range(2):
        proc = subprocess.run(["bash", "scripts/build-images"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=840, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if proc.stderr.count("is up to date") == len(IMAGES):
            break
    assert proc.stderr.count("is up to date") == len(IMAGES), proc.stderr
    assert "built" not in proc.stderr


@pytest.mark.usefixtures("images", "leak_check")
def test_worker_container_joins_the_grid(host_grid: HostGrid,
                                         docker_engine: docker.DockerClient) -> None:
    wid = f"img-worker-{RUN_ID}"
    worker = run_container(
        docker_engine, "xcloud-worker:latest",
        ["worker", "--name", wid, "--heartbeat", "0.5", "--tags", "container"],
        host_grid.env(wid, host_grid.token(wid, "worker")),
        name=f"xcloud-test-{wid}")
    try:
        wait_for(lambda: worker_state(host_grid, wid) == "online", timeout=60,
                 message=f"worker {wid} online (logs: {worker.logs()[-2000:]!r})")
        record = host_grid.store.get_worker(wid)
        assert record is not None
        assert "container" in record.tags
        # The client image sees it in the coordinator's listing.
        cid = f"img-client-{RUN_ID}"
        client = run_container(docker_engine, "xcloud-client:latest", ["workers", "--json"],
                               host_grid.env(cid, host_grid.token(cid, "client")))
        try:
            status = client.wait(timeout=60)
            out = client.logs(stdout=True, stderr=False).decode()
            assert status["StatusCode"] == 0, client.logs().decode()
        finally:
            client.remove(force=True)
        rows = json.loads(out)
        assert [r["state"] for r in rows if r["id"] == wid] == ["online"]
        # docker stop: TERM through the init to the agent, which says goodbye.
        worker.stop(timeout=20)
        wait_for(lambda: worker_state(host_grid, wid) == "offline", timeout=20,
                 message="worker offline after docker stop")
        assert worker.wait(timeout=10)["StatusCode"] == 0
    finally:
        worker.remove(force=True)


@pytest.mark.usefixtures("images", "leak_check")
def test_session_on_containerised_worker_sees_its_filesystem(
        host_grid: HostGrid, docker_engine: docker.DockerClient) -> None:
    from client.api import Grid

    wid = f"img-exec-{RUN_ID}"
    worker = run_container(
        docker_engine, "xcloud-worker:latest", ["worker", "--name", wid, "--heartbeat", "0.5"],
        host_grid.env(wid, host_grid.token(wid, "worker")), name=f"xcloud-test-{wid}")
    try:
        wait_for(lambda: worker_state(host_grid, wid) == "online", timeout=60,
                 message=f"worker {wid} online (logs: {worker.logs()[-2000:]!r})")
        config = Config(home=host_grid.config.home / "client")
        config.bus.url = host_grid.broker.url
        config.bus.root = host_grid.config.bus.root
        config.bus.principal = f"alice-{RUN_ID}"
        config.bus.token = host_grid.token(config.bus.principal, "client")
        with Grid.connect(config) as grid, grid.reserve(wid) as reserved:
            # /opt/xcloud exists in the image only, not on this host.
            result = reserved.run("test -x /opt/xcloud/bin/xcloud && echo in-image; id -un")
            assert result.exit_code == 0, result
            assert result.text.split() == ["in-image", "xcloud"]
    finally:
        worker.stop(timeout=20)
        worker.remove(force=True)


# -------------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> list[str]:
    """``docker compose`` (v2 plugin) or ``docker-compose`` (v1); skipped (failed in CI)
    when neither is installed."""
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    require_service("docker compose", "neither `docker compose` nor `docker-compose` is installed")


COMPOSE_FILES = ("compose.yaml", "compose.local.yaml")


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_uses_only_host_or_no_network(name: str) -> None:
    doc = yaml.safe_load((REPO / "docker" / name).read_text())
    services = doc["services"]
    assert services, name
    for service_name, service in services.items():
        assert service.get("network_mode") in ("host", "none"), (
            f"{name}: service {service_name} must use network_mode host or none")
        assert "networks" not in service
        assert "ports" not in service
    assert "networks" not in doc


def test_grid_compose_file_has_the_whole_grid() -> None:
    services = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]
    images = {name: str(s.get("image", "")) for name, s in services.items()}
    assert any(i.startswith("mariadb") for i in images.values())
    assert any(i.startswith("eclipse-mosquitto") for i in images.values())
    assert images["coordinator"].startswith("xcloud-coordinator")
    assert sum(i.startswith("xcloud-worker") for i in images.values()) == 3
    assert any(i.startswith("xcloud-client") for i in images.values())


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_config_validates(name: str, compose: list[str]) -> None:
    env = dict(os.environ, XCLOUD_ADMIN_TOKEN="x", XCLOUD_COORDINATOR_TOKEN="x",
               XCLOUD_WORKER1_TOKEN="x", XCLOUD_WORKER2_TOKEN="x", XCLOUD_WORKER3_TOKEN="x",
               XCLOUD_CLIENT_TOKEN="x", MARIADB_PASSWORD="x", MARIADB_ROOT_PASSWORD="x")
    proc = subprocess.run([*compose, "-f", str(REPO / "docker" / name), "config", "-q"],
                          capture_output=True, text=True, env=env, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.usefixtures("images")
def test_local_compose_grid_comes_up(free_port: int, compose: list[str]) -> None:
    """docker/compose.local.yaml end to end: three containerised workers come online."""
    project = f"xcloudtest{RUN_ID}"
    base = [*compose, "-p", project, "-f", str(REPO / "docker" / "compose.local.yaml")]
    env = dict(os.environ, XCLOUD_MQTT_PORT=str(free_port))

    def compose_run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, env=env,
                              check=False, timeout=timeout)

    try:
        up = compose_run("up", "-d")
        assert up.returncode == 0, up.stderr[-3000:]

        def online() -> list[str]:
            listed = compose_run("run", "--rm", "-T", "client", "workers", "--json")
            if listed.returncode != 0:
                return []
            try:
                rows = json.loads(listed.stdout[listed.stdout.index("["):])
            except ValueError:
                return []
            names = sorted(r["name"] for r in rows if r["state"] == "online")
            return names if len(names) == 3 else []

        names = wait_for(online, timeout=90, interval=0.5,
                         message="three compose workers online")
        assert names == ["worker-1", "worker-2", "worker-3"]
    finally:
        down = compose_run("down", "-v", "--remove-orphans")
        assert down.returncode == 0, down.stderr[-3000:]
