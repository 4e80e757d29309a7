"""Docker executor overheads: session start, and running ``true`` four ways.

1. ``open_session``: create + start a hardened session container (xcloud-busybox), then
   ``close_session`` (timed separately);
2. ``true`` through ``DockerExecutor.start`` + ``wait`` (wrapper script, streamed exec,
   exit inspection) in one long-lived session;
3. ``true`` through a bare low-level ``exec_create`` + ``exec_start`` + ``exec_inspect``
   in the same container (the engine's own exec cost);
4. ``docker run --rm --network none xcloud-busybox true`` (the CLI: a container per
   command, what per-job containers would cost);
5. ``true`` through ``ProcessExecutor`` (a local process group), for scale.

Every variant runs ``--runs`` times (default 50; 15 with --quick) after 3 warm-up runs;
latencies are wall times in milliseconds.

    python -m bench.docker_exec [--quick] [--runs N] [--image xcloud-busybox:latest]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.machine import machine_line
from bench.percentiles import latency_ms
from bench.report import cli, fmt, md_table
from broker.config import WorkerConfig
from worker.executors.base import SessionSpec, TaskSpec
from worker.executors.docker import DockerExecutor, container_of

WARMUP = 3


def _time(fn: Callable[[], object], runs: int) -> list[float]:
    for _ in range(WARMUP):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def run(quick: bool, runs: int | None, image: str) -> dict[str, Any]:
    n = runs or (15 if quick else 50)
    results: dict[str, Any] = {"runs": n, "image": image}
    ex = DockerExecutor(WorkerConfig(docker_image=image), worker_id="bench-docker-exec")
    api = ex.client.api
    with tempfile.TemporaryDirectory(prefix="xcloud-bench-") as tmp:
        counter = iter(range(10**9))

        # 1. session start / close
        opens: list[float] = []
        closes: list[float] = []
        for i in range(n // 2 if not quick else 8):
            work = Path(tmp) / f"s{i}"
            t0 = time.perf_counter()
            handle = ex.open_session(SessionSpec(f"bench-{i}", work, "bench"))
            t1 = time.perf_counter()
            ex.close_session(handle)
            t2 = time.perf_counter()
            opens.append(t1 - t0)
            closes.append(t2 - t1)
        results["open_session"] = latency_ms(opens)
        results["close_session"] = latency_ms(closes)

        session = ex.open_session(SessionSpec("bench-main", Path(tmp) / "main", "bench"))
        cid = container_of(session)
        try:
            def via_executor() -> None:
                spec = TaskSpec(f"t{next(counter)}", "true", session)
                handle = ex.start(spec, lambda _s, _d: None)
                result = ex.wait(handle, 30)
                assert result is not None, result
                assert result.exit_code == 0, result

            def bare_exec() -> None:
                exec_id = api.exec_create(cid, ["true"])["Id"]
                api.exec_start(exec_id)
                assert api.exec_inspect(exec_id)["ExitCode"] == 0

            results["executor_true"] = latency_ms(_time(via_executor, n))
            results["bare_exec_true"] = latency_ms(_time(bare_exec, n))
        finally:
            ex.close_session(session)
            ex.close()

        def docker_run() -> None:
            subprocess.run(["docker", "run", "--rm", "--network", "none", image, "true"],
                           check=True, stdout=subprocess.DEVNULL)

        results["docker_run_true"] = latency_ms(_time(docker_run, n))

        try:
            from worker.executors.process import ProcessExecutor
        except ImportError:
            results["process_true"] = None
        else:
            pex = ProcessExecutor(Path(tmp) / "pstate")
            psession = pex.open_session(SessionSpec("bench-p", Path(tmp) / "pwork", "bench"))

            def via_process() -> None:
                spec = TaskSpec(f"p{next(counter)}", "true", psession)
                handle = pex.start(spec, lambda _s, _d: None)
                result = pex.wait(handle, 30)
                assert result is not None, result
                assert result.exit_code == 0, result

            results["process_true"] = latency_ms(_time(via_process, n))
            pex.close_session(psession)
    return results


LABELS = [
    ("open_session", "open_session (create + start hardened container)"),
    ("close_session", "close_session (force remove)"),
    ("executor_true", "`true` via DockerExecutor (start + wait)"),
    ("bare_exec_true", "`true` via bare exec_create/start/inspect"),
    ("docker_run_true", "`docker run --rm --network none … true`"),
    ("process_true", "`true` via ProcessExecutor"),
]


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for key, label in LABELS:
        stats = result.get(key)
        if not stats:
            continue
        rows.append([label, stats["n"], fmt(stats["p50"], 1), fmt(stats["p99"], 1),
                     fmt(stats["max"], 1)])
    return (f"Docker executor overheads ({result['image']}; {machine_line(result['machine'])})"
            "\n\n" + md_table(["what", "n", "p50 ms", "p99 ms", "max ms"], rows))


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=None, help="samples per variant")
    parser.add_argument("--image", default="xcloud-busybox:latest")


if __name__ == "__main__":
    raise SystemExit(cli("docker_exec", __doc__ or "", run, markdown, add_args))
