"""The peers of ``bench.jobs``: the same 2 × 2 pool of ``true`` jobs on Celery (Redis,
RabbitMQ) and on Dask, timed the same way (see ``bench.jobs``'s docstring). Celery and
Dask come with ``pip install -e '.[bench]'``; a missing one is reported, not raised."""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing as mp
import os
import subprocess
import time
import uuid
from typing import Any

from bench.cpu_load import machine_busy_s
from bench.processes import die_with_parent, wait_until

log = logging.getLogger(__name__)

SLOTS = 2
WORKERS = 2
TASK_NAME = "xcloud_bench.run_true"
RUN_TIMEOUT_S = 600.0


def run_true(_index: int = 0) -> int:
    """The work of one job for Celery and Dask: the ``true`` command in a subprocess."""
    return subprocess.run(["true"], check=False).returncode


# ----------------------------------------------------------------------------- Celery


def _celery_app(broker: str, backend: str, queue: str, prefix: str) -> Any:
    Celery = importlib.import_module("celery").Celery

    app = Celery("xcloud_bench", broker=broker, backend=backend)
    opts = {"global_keyprefix": prefix} if broker.startswith("redis") else {}
    app.conf.update(task_default_queue=queue, broker_transport_options=opts,
                    result_backend_transport_options=opts, worker_prefetch_multiplier=4,
                    task_acks_late=False, result_expires=600, worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True)
    app.task(name=TASK_NAME)(run_true)
    return app


def _celery_worker(broker: str, backend: str, queue: str, prefix: str, name: str) -> None:
    die_with_parent()
    devnull = os.open(os.devnull, os.O_WRONLY)  # its banner would mix with the report
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    app = _celery_app(broker, backend, queue, prefix)
    app.worker_main(argv=["worker", "--concurrency", "2", "--pool", "prefork", "-Q", queue,
                          "-n", name, "--without-gossip", "--without-mingle",
                          "--without-heartbeat", "--loglevel", "WARNING"])


def _celery_cleanup(broker: str, queue: str, prefix: str) -> None:
    if broker.startswith("redis"):
        redis: Any = importlib.import_module("redis")
        client = redis.Redis.from_url(broker)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        return
    Connection = importlib.import_module("kombu").Connection

    with Connection(broker) as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_delete(queue)


def run_celery(broker: str, backend: str, n: int) -> dict[str, Any]:
    ResultSet = importlib.import_module("celery.result").ResultSet

    tag = uuid.uuid4().hex[:8]
    queue, prefix = f"xcloud-bench-{tag}", f"xcloud-bench-{tag}:"
    app = _celery_app(broker, backend, queue, prefix)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_celery_worker, daemon=False,
                         args=(broker, backend, queue, prefix, f"w{i}-{tag}@%h"))
             for i in range(WORKERS)]
    out: dict[str, Any] = {"workers": f"{WORKERS} worker processes × --concurrency 2 (prefork)"}
    try:
        for proc in procs:
            proc.start()
        task = app.tasks[TASK_NAME]

        def ready() -> bool:
            replies = app.control.ping(timeout=0.5, destination=None) or []
            return sum(1 for r in replies for k in r if k.endswith(tag) or tag in k) >= WORKERS

        wait_until(ready, 60, 0.5, "Celery workers")
        ResultSet([task.delay(i) for i in range(20)]).get(timeout=60)  # warm-up
        started, busy = time.monotonic(), machine_busy_s()
        results = ResultSet([task.delay(i) for i in range(n)])
        codes = results.get(timeout=RUN_TIMEOUT_S)  # join_native: one subscription
        elapsed = time.monotonic() - started
        out.update(n=n, seconds=elapsed, jobs_per_s=n / elapsed,
                   ok=sum(1 for c in codes if c == 0),
                   cpu_ms_per_job={"machine": (machine_busy_s() - busy) * 1000.0 / n})
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
    finally:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, 15)
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        with contextlib.suppress(Exception):
            _celery_cleanup(broker, queue, prefix)
    return out


# ----------------------------------------------------------------------------- Dask


def run_dask(n: int) -> dict[str, Any]:
    distributed: Any = importlib.import_module("dask.distributed")
    Client, LocalCluster = distributed.Client, distributed.LocalCluster

    out: dict[str, Any] = {"workers": "LocalCluster(n_workers=2, threads_per_worker=2, "
                                      "processes=True)"}
    try:
        with LocalCluster(n_workers=WORKERS, threads_per_worker=SLOTS, processes=True,
                          dashboard_address=":0", silence_logs=logging.WARNING
                          ) as cluster, Client(cluster) as client:
            client.gather(client.map(run_true, range(20), pure=False))  # warm-up
            started, busy = time.monotonic(), machine_busy_s()
            codes = client.gather(client.map(run_true, range(n), pure=False))
            elapsed = time.monotonic() - started
            out.update(n=n, seconds=elapsed, jobs_per_s=n / elapsed,
                       ok=sum(1 for c in codes if c == 0),
                       cpu_ms_per_job={"machine": (machine_busy_s() - busy) * 1000.0 / n})
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
    return out
