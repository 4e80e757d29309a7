"""A worker that runs nothing, for the coordinator's ceiling in ``bench.jobs``.

It speaks the worker's side of the job protocol and nothing else: retained ``worker.caps``
and ``worker.status`` online, a ``worker.heartbeat`` every second, and to each
``job.assign`` at once an ``attempt.report`` of success with no output, which acknowledges
the assignment too (as a real worker's short job does: it holds its ``ok`` back,
worker/assign_answers.py); the assignments carried in a report's answer
(``attempt.recorded``) are taken as the real worker takes them. With two of them in place
of ``xcloud worker``, a 2,000-job run measures what the coordinator, the broker and the
client cost per job when the workers cost nothing: the most jobs per second this
coordinator can give on the machine, whatever the workers become (BENCHMARKS.md §10).
Run as a process of its own (``python -m bench.instant_workers``, principal and token in
``XCLOUD_BUS_*``), as the real worker is, so that it shares no GIL with the client or the
coordinator.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from concurrent.futures import Future
from typing import Any

from broker.bus import Bus, Incoming, Lane, Will
from broker.config import BusConfig
from schemas.codec import Envelope
from schemas.job_messages import AttemptRecorded, AttemptReport, JobAssign
from schemas.messages import WorkerCaps, WorkerHeartbeat, WorkerStatus
from schemas.topics import Topics
from schemas.version import __version__
from worker.assign_answers import deliver_carried

HEARTBEAT_S = 1.0
COORDINATOR = "coordinator"  # the principal bench/job_grids.py gives the coordinator


class InstantWorker:
    """One simulated worker (see the module docstring)."""

    def __init__(self, url: str, root: str, wid: str, token: str, slots: int,
                 job_queue: int) -> None:
        self.wid = wid
        self.slots = slots
        self.job_queue = job_queue
        self.topics = Topics(root)
        self.stopped = threading.Event()
        self.bus = Bus(
            BusConfig(url=url, principal=wid, token=token, root=root),
            client_id=f"worker-{wid}", inbox=self.topics.worker_inbox(wid),
            will=Will(self.topics.worker_status(wid),
                      WorkerStatus(wid=wid, state="offline", clean=False,
                                   reason="connection lost"), qos=1, retain=True),
            persistent_session=True)

    def run(self) -> None:
        """Until ``stopped``: online, heartbeats, every assignment answered."""
        self.bus.on_inbox(JobAssign.TYPE, self._on_assign, lane=Lane.JOBS)
        self.bus.start(timeout=30)
        caps = WorkerCaps(
            wid=self.wid, name=self.wid, tags=["bench"], slots=self.slots,
            executors=["process"], job_queue=self.job_queue,
            host={"hostname": f"instant-{self.wid}", "os": "Linux", "arch": "x86_64",
                  "python": "3.11"},
            cpu={"count": 2, "physical": 2, "model": "none", "freq_mhz": 0.0},
            memory_bytes=8 * 2**30, heartbeat_s=HEARTBEAT_S, agent_version=__version__)
        self.bus.publish(self.topics.worker_caps(self.wid), caps, retain=True)
        self.bus.publish(self.topics.worker_status(self.wid),
                         WorkerStatus(wid=self.wid, state="online", clean=True), retain=True)
        seq = 0
        while not self.stopped.wait(0 if seq == 0 else HEARTBEAT_S):
            seq += 1
            self.bus.publish(self.topics.worker_heartbeat(self.wid), WorkerHeartbeat(
                wid=self.wid, seq=seq, interval_s=HEARTBEAT_S, cpu_percent=0.0,
                mem_used_bytes=0, free_slots=self.slots, attempts=[]), qos=0)
        self.bus.stop(publish=[(self.topics.worker_status(self.wid), WorkerStatus(
            wid=self.wid, state="offline", clean=True, reason="stopped"), 1, True)])

    def _on_assign(self, incoming: Incoming) -> None:
        body: JobAssign = incoming.body
        now = time.time()
        answer = self.bus.request_async(self.topics.coord_inbox, AttemptReport(
            attempt=body.attempt, kind="success", exit_code=0, duration_s=0.0,
            stdout=None, stderr=None, outputs=[], started_at=now, ended_at=now))
        answer.add_done_callback(self._answered)

    def _answered(self, answer: Future[Envelope[Any]]) -> None:
        if answer.cancelled() or answer.exception() is not None:
            return
        body = answer.result().body
        if isinstance(body, AttemptRecorded) and body.assign:
            deliver_carried(self.bus, self.topics.inbox_for(
                self.topics.worker_inbox(self.wid), COORDINATOR), COORDINATOR, body.assign)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instant_workers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", required=True, help="the broker's URL")
    parser.add_argument("--root", required=True, help="the grid's topic root")
    parser.add_argument("--name", required=True, help="the worker's principal id")
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--job-queue", type=int, default=2)
    args = parser.parse_args(argv)
    token = os.environ.get("XCLOUD_BUS_TOKEN", "")
    worker = InstantWorker(args.broker, args.root, args.name, token, args.slots,
                           args.job_queue)

    def stop(_signum: int, _frame: Any) -> None:
        worker.stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
