"""A worker whose owner turned ``[worker] docker_allow_image_override`` off runs only its
own image (worker/executors/docker/container.py): its caps say so (``docker.image_override``
and ``default_image``, worker/executors/docker/fingerprint.py), and the coordinator gives it
no job, image app, image archive app or reservation naming another image
(coordinator/job_matching.py, coordinator/store/apps.py, coordinator/matching.py);
``jobs.why`` and the submit warning say why. Workers are hand-driven (tests/job_actors.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from broker.config import WorkerConfig
from coordinator.job_state import JobState
from coordinator.store import JobRecord
from coordinator.store.apps import AppRecord, Unresolvable, resolve
from schemas.codec import decode, encode, envelope
from schemas.job_messages import JobsSubmit, JobsSubmitted, JobsWhy, JobsWhyReply
from schemas.messages import Error, Reserve, ReserveReply
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import JobClient, JobWorker, start_jobs_coordinator
from worker.caps import collect_caps
from worker.executors.base import EngineInfo
from worker.executors.docker.fingerprint import docker_capabilities

ONE_BROKER = pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)

OWN = "xcloud-base:bookworm"
OTHER = "alpine:3"
# Both hold both images: only the owner's policy tells them apart.
OWN_ONLY_DOCKER: dict[str, Any] = {"available": True, "image_override": False,
                                   "default_image": OWN, "images": [OWN, OTHER]}
OVERRIDE_DOCKER: dict[str, Any] = {"available": True, "image_override": True,
                                   "default_image": OWN, "images": [OWN, OTHER]}
REFUSAL = f"it runs only its own image {OWN} (docker_allow_image_override is off)"


def job(grid: GridHarness, jid: str) -> JobRecord:
    record = grid.store.get_job(jid)
    assert record is not None
    return record


def docker_worker(grid: GridHarness, wid: str, docker: dict[str, Any], slots: int = 1
                  ) -> JobWorker:
    worker = JobWorker(grid, wid)
    worker.join(executors=["process", "docker"], docker=docker, slots=slots)
    return worker


# -- the worker says it -------------------------------------------------------------------


@pytest.mark.parametrize("override", [False, True])
def test_the_fingerprint_reports_the_image_policy(tmp_path: Path, override: bool) -> None:
    config = WorkerConfig(docker_image="lab/own:2", docker_allow_image_override=override)
    docker = docker_capabilities(config, engine=EngineInfo(available=True, version="24.0.7",
                                                           images=("lab/own:2",)))
    caps = collect_caps("w1", config, tmp_path, [docker], "0.1.0")
    assert caps.docker == {"available": True, "version": "24.0.7", "api_version": None,
                           "images": ["lab/own:2"], "image_override": override,
                           "default_image": "lab/own:2"}
    assert decode(encode(envelope(caps))).body == caps  # within the schema's bounds


def test_an_image_the_schema_cannot_carry_is_reported_as_none(tmp_path: Path) -> None:
    config = WorkerConfig(docker_image="é" * 3, docker_allow_image_override=False)
    docker = docker_capabilities(config, engine=EngineInfo(available=True))
    caps = collect_caps("w1", config, tmp_path, [docker], "0.1.0")
    assert caps.docker is not None
    assert (caps.docker["image_override"], caps.docker["default_image"]) == (False, None)
    encode(envelope(caps))


# -- apps, as the scheduler resolves them ------------------------------------------------


def test_image_and_archive_apps_resolve_only_where_the_image_may_run() -> None:
    def caps(docker: dict[str, Any]) -> dict[str, Any]:
        return {"executors": ["docker"], "docker": {"images": [OWN, OTHER], **docker}}

    other = AppRecord(id="", owner="alice", name="tool", version="1", kind="image",
                      image=OTHER)
    own = AppRecord(id="", owner="alice", name="base", version="1", kind="image", image=OWN)
    archive = AppRecord(id="", owner="alice", name="packed", version="1",
                        kind="image_archive", sha256="ab" * 32, size=10)
    for app in (other, own, archive):
        assert resolve(app, caps(OVERRIDE_DOCKER)).kind == app.kind
        assert resolve(app, caps({"available": True})).kind == app.kind  # does not say
    assert resolve(own, caps(OWN_ONLY_DOCKER)).image == OWN
    with pytest.raises(Unresolvable,
                       match=re.escape(f"tool 1 runs in image {OTHER}, and {REFUSAL}")):
        resolve(other, caps(OWN_ONLY_DOCKER))
    with pytest.raises(Unresolvable, match="packed 1 runs in the image of its archive"):
        resolve(archive, caps(OWN_ONLY_DOCKER))


# -- jobs, reservations and why on a grid --------------------------------------------------


@ONE_BROKER
def test_an_own_image_worker_is_never_given_another_images_job(grid: GridHarness) -> None:
    start_jobs_coordinator(grid, unmatchable_hold_s=0)
    alice = JobClient(grid, "alice")
    own_only = docker_worker(grid, "own-only", OWN_ONLY_DOCKER, slots=4)
    override = docker_worker(grid, "override", OVERRIDE_DOCKER)
    override.auto = True
    grid.store.add_app("alice", "tool", "1", "image", image=OTHER)
    ids = alice.submit(*([{"command": "true", "requirements": {"image": OTHER}}] * 3),
                       {"app": {"name": "tool"}, "args": ["true"]})
    wait_for(lambda: all(job(grid, jid).state is JobState.COMPLETED for jid in ids), 20,
             message="the four jobs completed")
    assert [job(grid, jid).worker for jid in ids] == ["override"] * 4
    assert own_only.assigns == []
    # Its own image, or none named, it runs; and the process executor ignores images.
    own_image, no_image, process = alice.submit(
        {"command": "true", "requirements": {"image": OWN, "worker": "own-only"}},
        {"command": "true", "requirements": {"executor": "docker", "worker": "own-only"}},
        {"command": "true", "requirements": {"image": OTHER, "executor": "process",
                                             "worker": "own-only"}})
    assigned = {a.job for a in own_only.assigned(3)}
    assert assigned == {own_image, no_image, process}


@ONE_BROKER
def test_why_and_the_submit_warning_name_the_image_policy(grid: GridHarness) -> None:
    start_jobs_coordinator(grid, unmatchable_hold_s=0)
    alice = JobClient(grid, "alice")
    own_only = docker_worker(grid, "own-only", OWN_ONLY_DOCKER)
    reply = alice.request(JobsSubmit(jobs=[
        {"command": "true", "requirements": {"image": OTHER}}]))
    assert isinstance(reply, JobsSubmitted), reply
    (jid,) = reply.ids
    nobody = f"no worker may run image {OTHER}: their owners let them run only their own image"
    assert reply.warnings == [{"job": jid, "message": f"matches no known worker: {nobody}"}]
    why = alice.request(JobsWhy(job=jid))
    assert isinstance(why, JobsWhyReply), why
    rows = {(r["name"], r["wanted"]): r for r in why.requirements or ()}
    assert (rows[("image", OTHER)]["match"], rows[("image", OTHER)]["reject"]) == (1, 0)
    policy = rows[("image", f"{OTHER} allowed by the owner")]
    assert (policy["match"], policy["reject"]) == (0, 1)
    assert policy["example"] == f"own-only: {REFUSAL}"
    assert why.verdict == nobody.replace("no worker", "no online worker", 1)
    assert job(grid, jid).state is JobState.QUEUED
    assert own_only.assigns == []


@ONE_BROKER
def test_a_reservation_naming_another_image_skips_an_own_image_worker(
        grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    docker_worker(grid, "own-only", OWN_ONLY_DOCKER)
    refused = alice.request(Reserve(worker="own-only", image=OTHER))
    assert isinstance(refused, Error), refused
    assert refused.code == "conflict"
    assert REFUSAL in refused.message
    nobody = alice.request(Reserve(image=OTHER))
    assert isinstance(nobody, Error), nobody
    assert nobody.code == "not_found"
    docker_worker(grid, "override", OVERRIDE_DOCKER)
    granted = alice.request(Reserve(image=OTHER))
    assert isinstance(granted, ReserveReply), granted
    assert granted.reservation["worker"] == "override"
    own = alice.request(Reserve(worker="own-only", image=OWN))
    assert isinstance(own, ReserveReply), own
