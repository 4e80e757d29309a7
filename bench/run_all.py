"""Run every benchmark, write ``bench/results/latest.json`` and print the markdown.

    python -m bench.run_all [--quick] [--only broker_rtt,worker_idle] [--out PATH]

Before each benchmark the runner waits (at most a minute) for the machine to be nearly
idle and records the CPU use it saw, since other jobs on a small machine skew
every number.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

from bench.cpu_load import LoadMonitor, wait_for_quiet
from bench.machine import machine, machine_line
from bench.processes import quiet_logging
from bench.report import RESULTS_DIR, write_json

BENCHMARKS = ("broker_rtt", "heartbeat_ingest", "liveness_scale", "worker_idle", "transfer",
              "file_copy", "jobs", "scheduler_pass", "job_replicas", "terminal_echo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (~1.5 min in all)")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "latest.json",
                        help="where to write the JSON results")
    args = parser.parse_args(argv)
    quiet_logging()
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    modules = {name: importlib.import_module(f"bench.{name}") for name in names}
    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "benchmarks": {}}
    sections = []
    for name in names:
        module = modules[name]
        busy = wait_for_quiet()
        print(f"run_all: {name} (machine CPU before: {busy:.0f} %)", file=sys.stderr,
              flush=True)
        t0 = time.monotonic()
        load = LoadMonitor().start()
        result = module.run(quick=args.quick)
        result["load"] = load.stop()
        result["elapsed_s"] = round(time.monotonic() - t0, 1)
        result["machine_cpu_before_pct"] = busy
        results["benchmarks"][name] = result
        sections.append(module.markdown(result))
        write_json(args.out, results)  # keep what we have if a later one fails
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    write_json(args.out, results)
    print(f"## xcloud benchmarks ({'quick' if args.quick else 'full'})\n")
    print(f"Measured {machine_line(results['machine'])}.\n")
    for name, section in zip(names, sections):
        r = results["benchmarks"][name]
        print(section)
        print(f"\n({name}: {r['elapsed_s']} s; machine CPU before start "
              f"{r['machine_cpu_before_pct']:.0f} %, other processes' share of the machine "
              f"during the run {r['load']['others_pct']:.0f} %)\n")
    print(f"Total {results['elapsed_s']} s; results in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
