"""``xcloud why ID``: why a job is not running (docs/jobs.md, "Why is my job not running?").

client/cli.py calls ``add_why_parser``; the command imports the client API inside, so
``xcloud --help`` stays quick. ``why_text`` is the text the CLI and the shell print.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from client.cli_options import identity_options

if TYPE_CHECKING:
    from broker.config import Config

AddOptions = Callable[[argparse.ArgumentParser], None]


def add_why_parser(sub: Any, common: AddOptions) -> None:
    """``why`` under the top-level subparsers ``sub``."""
    help_text = "why a job is not running: its requirements against the workers, its place"
    p: argparse.ArgumentParser = sub.add_parser("why", help=help_text, description=help_text)
    common(p)
    identity_options(p)
    p.add_argument("job", help="the job id (j-...)")
    p.add_argument("--json", action="store_true", help="the coordinator's reply as JSON")
    p.set_defaults(func=cmd_why)


def cmd_why(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    with Grid.connect(config) as grid:
        reply = grid.jobs.why(args.job)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(why_text(reply))
    return 0


def why_text(reply: dict[str, Any]) -> str:
    """The verdict first, then (for a queued job) the counts behind it."""
    lines = [f"{reply.get('job')}: {reply.get('state')}: {reply.get('verdict')}"]
    workers = reply.get("workers")
    if not isinstance(workers, dict):
        return "\n".join(lines)
    lines.append(f"workers: {workers.get('known', 0)} known, {workers.get('online', 0)} online")
    rows = [r for r in reply.get("requirements") or () if isinstance(r, dict)]
    if rows:
        from client.table import render

        lines.append(render(
            ["REQUIREMENT", "WANTED", "MATCH", "REJECT", "E.G."],
            [[str(r.get("name")), str(r.get("wanted")), str(r.get("match")),
              str(r.get("reject")), str(r.get("example") or "")] for r in rows]))
    matching = reply.get("matching")
    if isinstance(matching, dict):
        lines.append(f"matching every requirement: {matching.get('all', 0)} "
                     f"({matching.get('free', 0)} with a free slot, {matching.get('busy', 0)} "
                     f"full, {matching.get('reserved', 0)} reserved, "
                     f"{matching.get('draining', 0)} draining)")
    if reply.get("ahead") is not None:
        more = "+" if reply.get("ahead_more") else ""
        lines.append(f"queued jobs ahead of it: {reply.get('ahead')}{more}")
    if reply.get("fairness"):  # fair share (docs/jobs.md, "Fair share and locality")
        lines.append(f"share: {reply.get('fairness')}")
    return "\n".join(lines)
