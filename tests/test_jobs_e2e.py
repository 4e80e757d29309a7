"""Batch jobs end to end: the real coordinator, real workers, the Python client and the CLI.

Every test runs on a real broker (amqtt and Mosquitto) with a real coordinator (the jobs
scheduler, tests/job_actors.py ``start_jobs_coordinator``) and real ``WorkerAgent``s (in
this process, or ``xcloud worker`` children where a worker is killed). The docker
executor runs where the test asks for ``executor_kind`` (XCLOUD_TEST_DOCKER=1).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from pathlib import Path

import psutil
import pytest

from client.api import Grid
from schemas.job_messages import TERMINAL_JOB_STATES
from tests.fixtures.backends import BOTH_DBS, BrokerHandle
from tests.fixtures.grid import HEARTBEAT_S, GridHarness, WorkerHandle
from tests.fixtures.services import BUSYBOX_IMAGE, wait_for
from tests.job_actors import start_jobs_coordinator

ALICE = "alice"
# What does not depend on the broker runs on one.
ONE_BROKER = pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)


def agent(grid: GridHarness, name: str, *, executor: str = "process",
          slots: int = 2, heartbeat_s: float = HEARTBEAT_S) -> WorkerHandle:
    """A WorkerAgent in this process with the given executor (docker: busybox)."""
    from worker.agent import WorkerAgent

    grid.token(name, "worker")
    cfg = grid.config_for(name, "worker")
    cfg.worker.heartbeat_s = heartbeat_s
    cfg.worker.slots = slots
    cfg.worker.executor = executor
    cfg.worker.docker_image = BUSYBOX_IMAGE
    handle = WorkerHandle(name, grid.tmp_path / "workers" / name)
    handle.agent = WorkerAgent(cfg, state_dir=handle.state_dir)
    grid.workers.append(handle)
    handle.agent.start(timeout=5)
    grid.wait_worker(name, "online", timeout=15)
    return handle


def alice(grid: GridHarness) -> Grid:
    client = grid.client(ALICE, "client")
    client.jobs.poll_s = 0.5
    return client


def states(client: Grid, job: str) -> list[str]:
    reply = client.jobs.show(job)
    return [str(a["kind"]) for a in reply.attempts]


def test_job_with_input_and_output_glob(grid: GridHarness, executor_kind: str,
                                        tmp_path: Path) -> None:
    start_jobs_coordinator(grid)
    worker = agent(grid, "w1", executor=executor_kind)
    client = alice(grid)
    data = tmp_path / "numbers.txt"
    data.write_text("".join(f"{i}\n" for i in range(1000)))
    fut = client.submit("sort -rn numbers.txt | head -n 3 > top.out; wc -l < numbers.txt; "
                        "echo warn >&2; exit 4",
                        inputs={"numbers.txt": data}, outputs=["*.out"], wall=60)
    result = fut.result(timeout=60)
    assert result.state == "failed"
    assert result.exit_code == 4
    assert result.stdout.strip() == b"1000"
    assert result.stderr == b"warn\n"
    assert [o.name for o in result.outputs] == ["top.out"]
    assert result.output("top.out") == b"999\n998\n997\n"
    assert worker.agent is not None
    cache = worker.agent.cache
    assert cache is not None
    assert cache.fetches == 1
    # the same input again: a cache hit, nothing fetched
    again = client.submit("wc -c < numbers.txt", inputs={"numbers.txt": data}).result(60)
    assert again.ok
    assert again.stdout.strip() == str(data.stat().st_size).encode()
    assert cache.fetches == 1
    # (more than one hit when the grid's 0.6 s liveness wrote the worker off under load
    # and the job ran again there: still nothing fetched twice)
    assert cache.hits >= 1


@ONE_BROKER
def test_count_gives_each_job_its_index(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=4)
    client = alice(grid)
    base = client.jobs.spec('echo "$XCLOUD_JOB_INDEX"')
    futures = client.jobs.submit_specs([dict(base, index=i) for i in range(20)])
    results = [f.result(timeout=90) for f in futures]
    assert sorted(int(r.stdout) for r in results) == list(range(20))
    assert all(r.state == "completed" for r in results)


@ONE_BROKER
def test_executor_map_and_wall_clock(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=3)
    client = alice(grid)
    with client.executor() as ex:
        outs = [r.stdout for r in ex.map("echo", ["a", "b c", "$HOME"])]
        slow = ex.submit("sleep 30", wall=1)
        done = next(cf.as_completed([slow], timeout=60)).result()
    assert outs == [b"a\n", b"b c\n", b"$HOME\n"]
    assert done.state == "failed"
    assert states(client, done.job) == ["wall_clock"]
    with pytest.raises(TypeError, match="not Python callables"):
        client.submit(print)  # type: ignore[arg-type]


def test_cancel_kills_the_running_command(grid: GridHarness, executor_kind: str) -> None:
    start_jobs_coordinator(grid)
    worker = agent(grid, "w1", executor=executor_kind)
    client = alice(grid)
    marker = f"61.{os.getpid()}"
    fut = client.submit(f"echo started; exec sleep {marker}")

    def victims() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"])
                if (p.info["cmdline"] or [])[-2:] == ["sleep", marker]]

    found = wait_for(victims, timeout=30, message="the job's process")
    assert fut.cancel()
    _gone, alive = psutil.wait_procs(found, timeout=20)
    assert not alive
    job = fut.job
    wait_for(lambda: client.jobs.show(job).job["state"] == "cancelled", timeout=30,
             message="job cancelled")
    assert worker.agent is not None
    runner = worker.agent.jobs
    assert runner is not None
    wait_for(lambda: not runner.all(), timeout=20, message="attempt forgotten by the worker")


def test_worker_killed_mid_job_is_requeued_elsewhere(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    doomed = grid.start_worker("w-doomed", in_subprocess=True, slots=1)
    client = alice(grid)
    fut = client.submit("echo from $XCLOUD_ATTEMPT_ID; sleep 3", system_retries=3)
    job = fut.job
    wait_for(lambda: client.jobs.show(job).job.get("worker") == "w-doomed"
             and client.jobs.show(job).job["state"] == "running", timeout=30,
             message="the job running on the doomed worker")
    doomed.kill()
    agent(grid, "w-spare")
    result = fut.result(timeout=60)
    assert result.state == "completed"
    kinds = states(client, job)
    assert kinds[-1] == "success"
    assert kinds[0] in ("worker_lost", "lease_expired")
    shown = client.jobs.show(job)
    assert shown.job["worker"] == "w-spare"
    assert shown.job["state"] in TERMINAL_JOB_STATES


@BOTH_DBS
def test_result_delivered_after_coordinator_restart(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    worker = agent(grid, "w1")
    client = alice(grid)
    fut = client.submit("sleep 2; echo survived")
    job = fut.job
    wait_for(lambda: worker.agent is not None and worker.agent.jobs is not None
             and any(a.record.phase == "running" for a in worker.agent.jobs.all()),
             timeout=30, message="the job running")
    grid.stop_coordinator()
    assert worker.agent is not None
    assert worker.agent.jobs is not None
    jobs = worker.agent.jobs
    wait_for(lambda: any(a.record.phase in ("finished", "reported") for a in jobs.all()),
             timeout=30, message="the job finished while the coordinator was down")
    start_jobs_coordinator(grid)
    result = fut.result(timeout=60)
    assert result.state == "completed"
    assert result.stdout == b"survived\n"
    assert states(client, job) == ["success"]


# On amqtt, EmbeddedBroker.stop_in_thread hung (> 10 s) in 2 of 4 runs of this test: a
# broker issue reported to the lead, not one of jobs; the outage is proven on Mosquitto.
@ONE_BROKER
def test_result_delivered_after_broker_restart(grid: GridHarness,
                                               grid_broker: BrokerHandle) -> None:
    start_jobs_coordinator(grid)
    worker = agent(grid, "w1")
    client = alice(grid)
    fut = client.submit("sleep 2; echo through the outage")
    assert worker.agent is not None
    jobs = worker.agent.jobs
    assert jobs is not None
    wait_for(lambda: any(a.record.phase == "running" for a in jobs.all()), timeout=30,
             message="the job running")
    grid_broker.stop()
    wait_for(lambda: any(a.record.phase in ("finished", "reported") for a in jobs.all()),
             timeout=30, message="the job finished while the broker was down")
    grid_broker.start()
    result = fut.result(timeout=90)
    assert result.state == "completed"
    assert result.stdout == b"through the outage\n"
    assert states(client, fut.job) == ["success"]


@ONE_BROKER
def test_shell_verbs(grid: GridHarness, tmp_path: Path) -> None:
    import io

    from client.console import Console
    from client.shell_commands import Shell
    from client.shell_syntax import ShellError

    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=2)
    client = alice(grid)
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(client, Console(out, err, False))
    shell.execute('submit --count 2 --output "*.txt" -- echo $XCLOUD_JOB_INDEX > i.txt; '
                  'echo "done # not a comment"')
    ids = [line for line in out.getvalue().splitlines() if line.startswith("j-")]
    assert len(ids) == 2
    shell.execute(f"wait {ids[0]} {ids[1]}")
    assert f"{ids[1]}  completed  exit 0" in out.getvalue()
    shell.execute("jobs completed")
    assert ids[0] in out.getvalue()
    dest = tmp_path / "r"
    shell.execute(f"results {ids[1]} {dest}")
    assert (dest / "stdout").read_text() == "done # not a comment\n"
    assert (dest / "outputs" / "i.txt").read_text() == "1\n"
    with pytest.raises(ShellError, match="usage"):
        shell.execute("submit echo no separator")
    shell.execute("submit -- sleep 60")
    last = out.getvalue().splitlines()[-2]
    shell.execute(f"cancel {last}")
    wait_for(lambda: client.jobs.show(last).job["state"] == "cancelled", timeout=30,
             message="cancelled from the shell")


@ONE_BROKER
def test_memory_limit_is_oom(grid: GridHarness, executor_kind: str) -> None:
    start_jobs_coordinator(grid)
    worker = agent(grid, "w1", executor=executor_kind)
    assert worker.agent is not None
    assert worker.agent.executor is not None
    # both executors enforce memory (rlimit or cgroup; the container's limit)
    assert "memory_bytes" in worker.agent.executor.capabilities().limits
    client = alice(grid)
    result = client.submit("awk 'BEGIN { s = \"x\"; while (1) s = s s }'",
                           memory="32M", wall=60).result(timeout=90)
    assert result.state == "failed"
    assert states(client, result.job) == ["oom"]
