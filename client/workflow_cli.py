"""``xcloud workflow run FILE`` and ``xcloud workflow status FILE`` (docs/jobs.md,
"Workflow files"; the logic is client/workflow.py).

client/cli.py calls ``add_workflow_parser``; the commands import the client API inside,
so ``xcloud --help`` stays quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from client.cli_options import identity_options

if TYPE_CHECKING:
    from broker.config import Config

AddOptions = Callable[[argparse.ArgumentParser], None]


def add_workflow_parser(sub: Any, common: AddOptions) -> None:
    """``workflow run|status`` under the top-level subparsers ``sub``."""
    help_text = "run a workflow file (TOML: jobs and their edges) with a rescue on rerun"
    top: argparse.ArgumentParser = sub.add_parser("workflow", help=help_text,
                                                  description=help_text)
    verbs = top.add_subparsers(dest="workflow_verb", metavar="{run,status}")

    def verb(name: str, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = verbs.add_parser(name, help=text, description=text)
        common(p)
        identity_options(p)
        p.add_argument("file", metavar="FILE", help="the workflow file (TOML)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = verb("run", "submit the workflow's jobs; with FILE.rescue.json present, only "
             "those that did not complete (or were edited)")
    p.add_argument("--wait", action="store_true",
                   help="follow the jobs to their end (exit 0 only if all completed)")
    p.add_argument("--check", action="store_true",
                   help="only read and check the file (names, cycles); submit nothing")
    p.set_defaults(func=cmd_workflow_run)
    p = verb("status", "each node's job id and state (from FILE.rescue.json)")
    p.set_defaults(func=cmd_workflow_status)


def _table(rows: list[tuple[str, str, str]]) -> str:
    from client.table import render

    return render(["NODE", "JOB", "STATE"], [list(r) for r in rows])


def cmd_workflow_run(args: argparse.Namespace, config: Config) -> int:
    from client import workflow

    wf = workflow.load(args.file)
    if args.check:
        order = " | ".join(" ".join(level) for level in wf.levels)
        print(f"{args.file}: {len(wf.nodes)} job(s), in order: {order}")
        return 0
    from client.api import Grid

    def say(line: str) -> None:
        print(line, file=sys.stderr)

    with Grid.connect(config) as grid:
        runs = workflow.run(grid, wf, say=say)
        ids = [j for r in runs.values() for j in r.jobs]
        if args.json:
            print(json.dumps({n: {"jobs": r.jobs, "action": r.action}
                              for n, r in runs.items()}))
        if not args.wait:
            return 0
        states = workflow.wait(grid, ids)
        rows = [(n, j, states.get(j, "unknown")) for n, r in runs.items() for j in r.jobs]
    if not args.json:
        print(_table(rows))
    bad = [r for r in rows if r[2] != "completed"]
    if bad:
        say(f"{len(bad)} job(s) did not complete: fix them and run `xcloud workflow run "
            f"{args.file}` again (completed jobs are kept)")
    return 0 if not bad else 1


def cmd_workflow_status(args: argparse.Namespace, config: Config) -> int:
    from client import workflow
    from client.api import Grid

    wf = workflow.load(args.file)
    with Grid.connect(config) as grid:
        rows = workflow.status(grid, wf)
    if args.json:
        print(json.dumps([{"node": n, "job": j, "state": s} for n, j, s in rows]))
    else:
        print(_table(rows))
    return 0
