"""GPUs for jobs and reservations (docs/gpus.md, "Scheduling" and "Assignment").

Unit tests of the arithmetic (coordinator/gpu_capacity.py, the scheduler's ``Capacity``,
the worker's allocator in worker/job_gpus.py), then a real grid: a worker with two
simulated GPUs (an ``xcloud worker`` child whose PATH has a fake ``nvidia-smi`` serving
the H100 capture of tests/data/gpu/ as two GPUs) beside a worker without GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from broker.bus import RemoteError
from coordinator import gpu_capacity, matching
from coordinator.job_state import JobState
from coordinator.scheduler import Capacity, JobScheduler
from coordinator.store import WorkerRecord
from coordinator.store.job_records import JobRecord
from coordinator.worker_state import WorkerState
from schemas.codec import encode, envelope
from schemas.errors import WireError
from schemas.job_messages import JobAssign, JobsSubmit
from schemas.messages import Ok
from tests.fixtures.backends import BOTH_DBS
from tests.fixtures.grid import GridHarness, WorkerHandle
from tests.fixtures.services import wait_for
from tests.job_actors import start_jobs_coordinator
from tests.test_job_runner import StandIn, new_id, standin  # noqa: F401 (a fixture)
from tests.test_jobs_e2e import ALICE, agent, alice
from worker.gpu_sources import MIB, GpuInfo
from worker.job_gpus import GpuAllocator, GpuAsk, device_ids, gpu_env

REPO = Path(__file__).resolve().parents[1]
CAPTURE = REPO / "tests" / "data" / "gpu" / "h100-80gb" / "nvidia-smi-query.csv"
ONE_BROKER = pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)
ONE_DB = BOTH_DBS  # the GPU count is a join: both backends

H100_UUID = "GPU-592d4872-1c04-4b9f-9910-b853ee34dfc8"
H100_BYTES = 81559 * MIB


def h100(index: int, *, uuid: bool = True, name: str = "NVIDIA H100 80GB HBM3",
         memory: int = H100_BYTES) -> GpuInfo:
    return GpuInfo(index=index, vendor="nvidia", name=name,
                   uuid=f"{H100_UUID[:-1]}{index}" if uuid else None, memory_bytes=memory,
                   driver="580.159.04", compute_capability="9.0")


def wire(gpu: GpuInfo) -> dict[str, Any]:
    return gpu.to_wire()


def worker_record(wid: str, gpus: list[GpuInfo], *, slots: int = 4) -> WorkerRecord:
    caps: dict[str, Any] = {"gpus": [wire(g) for g in gpus]} if gpus else {}
    return WorkerRecord(
        id=wid, name=wid, state=WorkerState.ONLINE, state_reason="", state_changed_at=0.0,
        description="", tags=[], caps=caps, cpus=8, memory_bytes=32 * 2**30, os="linux",
        arch="x86_64", executors=["process"], slots=slots, free_slots=slots,
        heartbeat_interval=5.0, first_seen=0.0, last_seen=0.0, last_heartbeat_at=None,
        last_metrics={}, heartbeat_seq=0)


def job_record(jid: str, gpus: int = 0, **spec: Any) -> JobRecord:
    full = {"command": "true", **spec}
    if gpus:
        full.setdefault("resources", {})["gpus"] = gpus
    return JobRecord(
        id=jid, batch="b-1", owner="alice", name="", state=JobState.QUEUED, priority=0,
        submitted_at=0.0, spec=full, cpus=1, memory_bytes=0, max_system_retries=3,
        max_retries=0, system_failures=0, job_failures=0, attempts=0,
        current_attempt=None, worker=None, exit_code=None, started_at=None, ended_at=None,
        hold_reason=None, hold_code=None, hold_detail=None, gpus=gpus)


# ------------------------------------------------------------------ coordinator arithmetic


def test_free_gpus_are_the_matching_ones_minus_the_held_ones() -> None:
    caps = {"gpus": [wire(h100(0)), wire(h100(1)),
                     wire(h100(2, name="NVIDIA A10", memory=24 * 2**30))]}
    assert gpu_capacity.free_gpus(caps, gpu_capacity.GpuAsk(1), held=0) == 3
    assert gpu_capacity.free_gpus(caps, gpu_capacity.GpuAsk(1), held=2) == 1
    by_name = gpu_capacity.GpuAsk(1, name="h100")  # any case
    assert gpu_capacity.free_gpus(caps, by_name, held=0) == 2
    assert gpu_capacity.free_gpus(caps, by_name, held=1) == 1  # held ones may be H100s
    by_memory = gpu_capacity.GpuAsk(1, memory_bytes=40 * 2**30)
    assert gpu_capacity.free_gpus(caps, by_memory, held=0) == 2
    assert gpu_capacity.free_gpus(caps, gpu_capacity.GpuAsk(1, name="A100"), held=0) == 0
    assert gpu_capacity.free_gpus({}, gpu_capacity.GpuAsk(1), held=0) == 0
    assert gpu_capacity.free_gpus(caps, gpu_capacity.GpuAsk(1), held=5) == 0


def test_job_asks_read_from_the_spec() -> None:
    ask = gpu_capacity.job_ask({"resources": {"gpus": 2, "gpu_memory_bytes": 2**35},
                                "requirements": {"gpu_name": "H100"}})
    assert ask == gpu_capacity.GpuAsk(2, 2**35, "H100")
    assert gpu_capacity.job_ask({"command": "x"}) == gpu_capacity.GpuAsk()
    assert gpu_capacity.job_ask({"resources": {"gpus": True}}).count == 0


def test_capacity_fits_gpu_jobs_and_counts_them_as_taken() -> None:
    two = Capacity(worker_record("gpu", [h100(0), h100(1)]), (0, 0, 0))
    none = Capacity(worker_record("plain", []), (0, 0, 0))
    one_job, three_job, plain_job = job_record("j1", 1), job_record("j3", 3), job_record("j0")
    assert two.fits_gpus(one_job)
    assert not none.fits_gpus(one_job)
    assert not two.fits_gpus(three_job)  # never: the worker has two
    assert none.fits_gpus(plain_job)
    assert two.fits_gpus(plain_job)
    assert JobScheduler._place(one_job, [none, two]) is two
    assert JobScheduler._place(three_job, [none, two]) is None
    assert two.take(one_job) == 1
    assert (two.free, two.gpus_held) == (3, 1)
    assert two.take(one_job) == 1
    assert not two.fits_gpus(one_job)  # both held in this pass
    assert JobScheduler._place(one_job, [none, two]) is None
    assert JobScheduler._place(plain_job, [none, two]) is not None  # slots are left
    held = Capacity(worker_record("gpu", [h100(0), h100(1)]), (1, 1, 0), gpus_held=1)
    assert held.fits_gpus(one_job)
    assert not held.fits_gpus(job_record("j2", 2))


def test_reservation_requirements_refuse_workers_without_enough_gpus() -> None:
    plain, gpu = worker_record("plain", []), worker_record("gpu", [h100(0), h100(1)])
    assert matching.mismatch(plain, {"gpus": 1}, None) == "it has no GPUs, 1 GPU(s) wanted"
    assert matching.mismatch(gpu, {"gpus": 2}, None) is None
    assert "it has 2 matching GPU(s)" in str(matching.mismatch(gpu, {"gpus": 3}, None))
    assert matching.mismatch(gpu, {"gpus": 1, "gpu_name": "a100"}, None) is not None
    assert matching.mismatch(gpu, {"gpu_name": "h100"}, None) is None
    assert matching.mismatch(plain, {}, None) is None


def test_the_job_spec_schema_bounds_the_gpu_asks() -> None:
    def ok(spec: dict[str, Any]) -> bool:
        try:
            encode(envelope(JobsSubmit(jobs=[spec])))
        except WireError:
            return False
        return True

    assert ok({"command": "x", "resources": {"gpus": 16, "gpu_memory_bytes": 2**35},
               "requirements": {"gpu_name": "H100"}})
    assert not ok({"command": "x", "resources": {"gpus": 17}})
    assert not ok({"command": "x", "resources": {"gpus": -1}})
    assert not ok({"command": "x", "requirements": {"gpu_name": "x" * 65}})
    assert not ok({"command": "x", "requirements": {"gpu_name": ""}})


def test_reservation_requirements_are_checked_by_the_client() -> None:
    from client.errors import InvalidRequest
    from client.validation import check_requirements

    check_requirements({"gpus": 2, "gpu_memory_bytes": 2**35, "gpu_name": "H100"})
    for bad in ({"gpus": 17}, {"gpus": "2"}, {"gpus": -1}, {"gpu_name": "x" * 65}):
        with pytest.raises(InvalidRequest):
            check_requirements(bad)


# ------------------------------------------------------------------------ worker allocator


def test_allocator_gives_distinct_gpus_and_frees_them_when_the_holder_ends() -> None:
    live = {"a1", "a2", "a3"}
    alloc = GpuAllocator(lambda: [h100(0), h100(1)], holder_live=lambda h: h in live)
    first = alloc.take("a1", GpuAsk(1))
    second = alloc.take("a2", GpuAsk(1))
    assert first is not None
    assert second is not None
    assert {g.index for g in first} | {g.index for g in second} == {0, 1}
    assert alloc.take("a3", GpuAsk(1)) is None  # both held
    assert alloc.in_use() == 2
    live.discard("a1")  # its attempt ended
    third = alloc.take("a3", GpuAsk(1))
    assert third == first
    assert alloc.take("a4", GpuAsk(0)) == []
    assert alloc.take("a3", GpuAsk(1)) == third  # asking again changes nothing


def test_allocator_honours_memory_and_name() -> None:
    small = h100(1, name="NVIDIA A10", memory=24 * 2**30)
    alloc = GpuAllocator(lambda: [h100(0), small])
    assert alloc.take("a", GpuAsk(2, name="H100")) is None
    assert alloc.take("b", GpuAsk(1, memory_bytes=40 * 2**30)) == [h100(0)]
    assert alloc.take("c", GpuAsk(1, memory_bytes=40 * 2**30)) is None
    assert alloc.take("d", GpuAsk(1, name="a10")) == [small]


def test_allocator_detects_lazily_and_refreshes_after_its_ttl() -> None:
    calls: list[float] = []
    now = [0.0]

    def inventory() -> list[GpuInfo]:
        calls.append(now[0])
        return [h100(0)]

    alloc = GpuAllocator(inventory, ttl_s=60.0, clock=lambda: now[0])
    assert calls == []  # nothing until a GPU job comes
    assert alloc.take("a", GpuAsk(0)) == []
    assert calls == []
    alloc.take("b", GpuAsk(1))
    alloc.take("c", GpuAsk(1))
    now[0] = 61.0
    alloc.gpus()
    assert calls == [0.0, 61.0]


def test_env_names_uuids_when_all_are_known_else_indexes() -> None:
    assert gpu_env([h100(1)]) == {"CUDA_VISIBLE_DEVICES": f"{H100_UUID[:-1]}1",
                                  "NVIDIA_VISIBLE_DEVICES": f"{H100_UUID[:-1]}1"}
    assert device_ids([h100(0), h100(1, uuid=False)]) == ["0", "1"]
    assert gpu_env([]) == {}


# ---------------------------------------------------------------------------- a real grid

FAKE_NVIDIA_SMI = '''#!{python}
"""nvidia-smi serving the captured H100 as {count} GPUs (each its own index and uuid)."""
import sys

captured = ("index uuid name memory.total memory.used memory.free driver_version "
            "compute_cap utilization.gpu utilization.memory temperature.gpu power.draw "
            "power.limit pci.bus_id mig.mode.current").split()
row = dict(zip(captured, (v.strip() for v in open({capture!r}).read().split(","))))
args = [a for a in sys.argv[1:] if a.startswith("--query-gpu=")]
if not args:
    sys.exit(2)
fields = args[0].split("=", 1)[1].split(",")
for index in range({count}):
    values = dict(row, index=str(index), uuid=row["uuid"][:-1] + str(index))
    print(", ".join(values[f] for f in fields))
'''


def gpu_worker(grid: GridHarness, name: str, count: int, slots: int) -> None:
    """``xcloud worker`` whose PATH finds a fake nvidia-smi with ``count`` GPUs. Only the
    child's PATH: an in-process agent probing for GPUs meanwhile must not find it (this
    test's PATH was once patched process-wide, and the plain worker saw two GPUs)."""
    bin_dir = grid.tmp_path / f"bin-{name}"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(FAKE_NVIDIA_SMI.format(python=sys.executable, count=count,
                                             capture=str(CAPTURE)))
    script.chmod(0o755)
    grid.start_worker(name, in_subprocess=True, slots=slots, env={
        "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])})


def submit_cli(grid: GridHarness, cwd: Path, *args: str, ok: bool = True) -> str:
    """``xcloud submit --json ARGS`` as alice; the job's id (``ok=False``: its stderr,
    expecting it to fail)."""
    env = grid.subprocess_env(XCLOUD_HOME=str(cwd / "home"), XCLOUD_BUS_PRINCIPAL=ALICE,
                              XCLOUD_BUS_TOKEN=grid.token(ALICE, "client"),
                              XCLOUD_BUS_URL=grid.url, XCLOUD_BUS_ROOT=grid.root)
    done = subprocess.run([sys.executable, "-m", "client.cli", "submit", "--json", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    if not ok:
        assert done.returncode != 0, done.stdout
        return done.stderr
    assert done.returncode == 0, done.stderr
    (jid,) = json.loads(done.stdout)
    return str(jid)


def job_state(grid: GridHarness, jid: str) -> JobRecord:
    record = grid.store.get_job(jid)
    assert record is not None
    return record


def passes_go_by(grid: GridHarness, n: int = 3) -> None:
    """Let ``n`` scheduler passes run (each sees the whole queue)."""
    scheduler = grid.coordinator.scheduler  # type: ignore[union-attr]
    target = scheduler.passes + n
    scheduler.poke()
    wait_for(lambda: scheduler.passes >= target, timeout=10)


@ONE_BROKER
@ONE_DB
def test_gpu_jobs_get_distinct_gpus_and_wait_for_a_free_one(
        grid: GridHarness, tmp_path: Path) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "plain", slots=4)  # no nvidia-smi on this PATH, no pynvml: no GPUs
    gpu_worker(grid, "gpu2", count=2, slots=4)
    gpu_record, plain_record = grid.worker_record("gpu2"), grid.worker_record("plain")
    assert gpu_record is not None
    assert plain_record is not None
    gpu_id = gpu_record.id
    assert [g["uuid"] for g in gpu_capacity.caps_gpus(gpu_record.caps)] == [
        f"{H100_UUID[:-1]}0", f"{H100_UUID[:-1]}1"]
    assert not gpu_capacity.caps_gpus(plain_record.caps)
    client = alice(grid)

    # A reservation that asks for a GPU refuses the worker without one.
    from client.reservation import Refused

    with pytest.raises(Refused, match="no GPUs"):
        client.reserve("plain", any={"gpus": 1})
    with client.reserve(any={"gpus": 2}) as reserved:
        assert reserved.worker == gpu_id

    gate = tmp_path / "gate"
    gate.mkdir()
    hold = ('echo "$CUDA_VISIBLE_DEVICES"; echo "$NVIDIA_VISIBLE_DEVICES" >&2; '
            f'while [ ! -e {gate}/$XCLOUD_JOB_ID ]; do sleep 0.05; done')
    first = client.submit(hold, gpus=1, wall=120)
    second = client.submit(hold, gpus=1, wall=120)
    wait_for(lambda: all(job_state(grid, f.job).state == JobState.RUNNING
                         for f in (first, second)), timeout=30)
    assert {job_state(grid, f.job).worker for f in (first, second)} == {gpu_id}
    third = client.submit(hold, gpus=1, wall=120)
    never_id = submit_cli(grid, tmp_path, "--gpus", "3", "--gpu-memory", "40G",
                          "--gpu-name", "h100", "--", "true")
    never_spec = job_state(grid, never_id).spec
    assert never_spec["resources"] == {"gpus": 3, "gpu_memory_bytes": 40 * 2**30}
    assert never_spec["requirements"] == {"gpu_name": "h100"}
    assert job_state(grid, never_id).gpus == 3
    refused = submit_cli(grid, tmp_path, "--gpus", "17", "--", "true", ok=False)
    assert "gpus" in refused
    assert "Traceback" not in refused
    plain = client.submit("echo plain", wall=60)  # no GPUs asked: any worker
    assert plain.result(timeout=60).ok
    passes_go_by(grid)
    assert job_state(grid, third.job).state == JobState.QUEUED  # both GPUs are held
    assert job_state(grid, never_id).state == JobState.QUEUED  # no worker has three

    (gate / first.job).touch()
    done = first.result(timeout=60)
    assert done.ok
    wait_for(lambda: job_state(grid, third.job).state == JobState.RUNNING, timeout=30)
    assert job_state(grid, third.job).worker == gpu_id
    (gate / second.job).touch()
    (gate / third.job).touch()
    outs = [f.result(timeout=60) for f in (second, third)]
    devices = [r.stdout.decode().strip() for r in (done, *outs)]
    assert set(devices[:2]) == {f"{H100_UUID[:-1]}0", f"{H100_UUID[:-1]}1"}
    assert devices[2] == devices[0]  # the one the first job gave back
    assert done.stderr.decode().strip() == devices[0]
    assert job_state(grid, never_id).state == JobState.QUEUED
    client.jobs.cancel([never_id])


# ------------------------------------------------------- the runner against a stand-in


def assign_gpu_job(coord: StandIn, command: str, gpus: int) -> tuple[str, Any]:
    """job.assign of a job asking ``gpus``; (attempt, the reply or the RemoteError)."""
    attempt = new_id("a")
    body = JobAssign(attempt=attempt, job=new_id("j"), owner="alice",
                     spec={"command": command, "resources": {"gpus": gpus}}, inputs=[],
                     lease_s=30)
    try:
        return attempt, coord.send_assign(body)
    except RemoteError as err:
        return attempt, err


@ONE_BROKER
def test_runner_hands_distinct_gpus_and_refuses_busy_when_none_is_free(
        standin: tuple[StandIn, WorkerHandle],  # noqa: F811 (the imported fixture)
        tmp_path: Path) -> None:
    coord, worker = standin
    assert worker.agent is not None
    wait_for(lambda: worker.agent is not None and worker.agent.jobs is not None, timeout=10)
    jobs = worker.agent.jobs
    assert jobs is not None
    jobs.gpus.inventory = lambda: [h100(0), h100(1, uuid=False)]
    gate = tmp_path / "gate"
    gate.mkdir()
    hold = (f'echo "$CUDA_VISIBLE_DEVICES $NVIDIA_VISIBLE_DEVICES" '
            f'> {gate}/$XCLOUD_ATTEMPT_ID.env; '
            f'while [ ! -e {gate}/$XCLOUD_ATTEMPT_ID ]; do sleep 0.05; done')
    first, ok1 = assign_gpu_job(coord, hold, 1)
    second, ok2 = assign_gpu_job(coord, hold, 1)
    assert isinstance(ok1, Ok)
    assert isinstance(ok2, Ok)
    _, refused = assign_gpu_job(coord, hold, 1)
    assert isinstance(refused, RemoteError)
    assert refused.code == "busy"
    assert "GPU" in str(refused)
    _, too_many = assign_gpu_job(coord, hold, 3)
    assert isinstance(too_many, RemoteError)
    assert too_many.code == "busy"
    plain = coord.assign("echo \"[$CUDA_VISIBLE_DEVICES]\"")  # no GPUs: a slot is enough
    assert coord.data(coord.report(plain).stdout) == b"[]\n"
    (gate / first).touch()
    assert coord.report(first).kind == "success"
    third, ok3 = assign_gpu_job(coord, hold, 1)  # the first one's GPU is free again
    assert isinstance(ok3, Ok)
    outs = []
    for attempt in (first, second, third):
        (gate / attempt).touch()
        assert coord.report(attempt).kind == "success"
        outs.append((gate / f"{attempt}.env").read_text().split())
    assert {o[0] for o in outs[:2]} == {f"{H100_UUID[:-1]}0", "1"}  # "1": no uuid known
    assert outs[2] == outs[0]
    assert all(o[0] == o[1] for o in outs)  # CUDA_ and NVIDIA_VISIBLE_DEVICES agree


# ------------------------------------------------------------------ docker device request


class FakeDockerApi:
    """The low-level API calls ``Containers.create`` makes, recorded."""

    def __init__(self) -> None:
        self.host_config: dict[str, Any] = {}

    def inspect_image(self, image: str) -> dict[str, Any]:
        return {"Id": image}

    def create_host_config(self, **kwargs: Any) -> dict[str, Any]:
        self.host_config = kwargs
        return kwargs

    def create_container(self, image: str, **kwargs: Any) -> dict[str, Any]:  # noqa: ARG002
        return {"Id": "c" * 64}

    def start(self, cid: str) -> None:
        pass


def test_docker_session_gets_a_device_request_only_with_gpus(tmp_path: Path) -> None:
    from broker.config import WorkerConfig
    from worker.executors.docker.container import ContainerParams, Containers
    from worker.job_gpus import GpuSessionSpec

    api = FakeDockerApi()
    client = SimpleNamespace(api=api)
    containers = Containers(WorkerConfig(), "w1", client=client)  # type: ignore[arg-type]
    spec = GpuSessionSpec(session_id="a-1", workdir=tmp_path, owner="alice",
                          gpu_devices=(f"{H100_UUID[:-1]}1",))
    params = containers.params(spec)
    assert params.gpus == (f"{H100_UUID[:-1]}1",)
    assert ContainerParams.from_dict(params.to_dict()) == params  # kept for a recreate
    containers.create("a-1", str(tmp_path), params)
    (request,) = api.host_config["device_requests"]
    assert request["Driver"] == "nvidia"
    assert request["DeviceIDs"] == [f"{H100_UUID[:-1]}1"]
    assert request["Capabilities"] == [["gpu"]]
    plain = containers.params(GpuSessionSpec(session_id="a-2", workdir=tmp_path,
                                             owner="alice"))
    containers.create("a-2", str(tmp_path), plain)
    assert "device_requests" not in api.host_config
