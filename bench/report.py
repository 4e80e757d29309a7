"""How a benchmark is run and reported: ``python -m bench.<name> [--quick] [--json PATH]``
(``cli``), the numbers and markdown tables of its report, and its JSON result (kept
under bench/results/ by ``run_all`` and ``exec_rtt``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.cpu_load import LoadMonitor
from bench.machine import machine
from bench.processes import quiet_logging

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- markdown


def fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)):
        if digits == 0:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}"
    return str(value)


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "–"
    return f"{a / b:.{digits}f}×"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right."""
    align = [":---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def cli(name: str, description: str,
        run: Callable[..., dict[str, Any]], markdown: Callable[[dict[str, Any]], str],
        add_args: Callable[[argparse.ArgumentParser], None] | None = None,
        argv: Sequence[str] | None = None) -> int:
    """``python -m bench.<name> [--quick] [--json PATH] [extra args]``."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes (under ~20 s)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    quiet_logging()
    extra = {k: v for k, v in vars(args).items() if k not in ("quick", "json")}
    started = time.monotonic()
    load = LoadMonitor().start()
    result = run(quick=args.quick, **extra)
    result["load"] = load.stop()
    result.setdefault("elapsed_s", round(time.monotonic() - started, 1))
    result.setdefault("machine", machine())
    print(markdown(result))
    print(f"\n({name}: {result['elapsed_s']} s; other processes used "
          f"{result['load']['others_pct']:.0f} % of the machine meanwhile)", file=sys.stderr)
    if args.json:
        write_json(args.json, result)
    return 0
