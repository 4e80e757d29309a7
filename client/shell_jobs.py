"""The shell's batch-job verbs: ``submit``, ``jobs``, ``wait``, ``results``, ``cancel``
(docs/jobs.md). No worker needs to be reserved: they talk to the coordinator through
``grid.jobs`` (client/jobs.py), like ``xcloud submit`` and friends.

    submit [--count N] [--input NAME=PATH ...] [--output GLOB ...] [--wall 10m] -- CMD
    jobs [STATE]
    wait ID... | --all
    results ID [DIR]
    cancel ID...
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, NoReturn

from client.shell_syntax import ShellError

if TYPE_CHECKING:
    from client.console import Console
    from client.jobs import JobStore

SUBMIT_USAGE = ("submit [--count N] [--input NAME=PATH|SHA256 ...] [--output GLOB ...] "
                "[--wall 10m] [--memory 1G] [--cpus N] [--env K=V ...] -- CMD")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ShellError(f"{message}; usage: {SUBMIT_USAGE}")


def _submit_parser() -> _Parser:
    p = _Parser(prog="submit", add_help=False)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--input", action="append", default=[])
    p.add_argument("--output", action="append", default=[])
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--wall")
    p.add_argument("--memory")
    p.add_argument("--cpus", type=int)
    p.add_argument("command", nargs=argparse.REMAINDER)
    return p


def submit(store: JobStore, console: Console, rest: str) -> list[str]:
    """``submit OPTIONS -- CMD``: CMD is everything after `` -- ``, as typed (a shell
    command line: ``$VARS`` expand on the worker). Prints and returns the new job ids."""
    import shlex

    from client.jobs_cli import _inputs, _pairs

    options, sep, command = f" {rest}".partition(" -- ")
    if not sep or not command.strip():
        raise ShellError(f"usage: {SUBMIT_USAGE}")
    try:
        words = shlex.split(options)
    except ValueError as err:
        raise ShellError(str(err)) from None
    args = _submit_parser().parse_args(words)
    if args.command:
        raise ShellError(f"unexpected {args.command[0]!r} before --; usage: {SUBMIT_USAGE}")
    if not 1 <= args.count <= 100_000:
        raise ShellError("--count is 1 to 100000")
    command = command.strip()
    base = store.spec(command, inputs=_inputs(args.input), outputs=args.output,
                      env=_pairs(args.env, "--env"), wall=args.wall, memory=args.memory,
                      cpus=args.cpus)
    futures = store.submit_specs([dict(base, index=i) for i in range(args.count)])
    ids = [f.job for f in futures]
    console.print("\n".join(ids) if len(ids) <= 20 else
                  f"{ids[0]} … {ids[-1]}")
    console.print(f"submitted {len(ids)} job(s)")
    return ids


def jobs(store: JobStore, console: Console, words: list[str]) -> None:
    """``jobs [STATE]``: the condor_q-like table."""
    from client.jobs_cli import jobs_table

    if len(words) > 1:
        raise ShellError("usage: jobs [queued|running|held|completed|failed|cancelled]")
    items = store.ls(state=words[0] if words else None, limit=1000)
    console.print(jobs_table(items) if items else "no jobs (submit some with `submit`)")


def wait(store: JobStore, console: Console, words: list[str]) -> None:
    """``wait ID... | --all``: blocks until they end, one line each."""
    if not words:
        raise ShellError("usage: wait ID... | --all")
    ids = [w for w in words if w != "--all"]
    if "--all" in words:
        for state in ("queued", "running"):
            ids += [str(j["id"]) for j in store.ls(state=state)]
    for result in store.wait(dict.fromkeys(ids)):
        code = "-" if result.exit_code is None else result.exit_code
        console.print(f"{result.job}  {result.state}  exit {code}")


def results(store: JobStore, console: Console, words: list[str]) -> None:
    """``results ID [DIR]``: stdout, stderr and outputs written into DIR (default ./ID)."""
    if not 1 <= len(words) <= 2:
        raise ShellError("usage: results ID [DIR]")
    from schemas.job_messages import TERMINAL_JOB_STATES

    result = store.result(words[0])
    if result.state not in TERMINAL_JOB_STATES:
        raise ShellError(f"job {words[0]} is {result.state}: no results yet")
    written = result.save(words[1] if len(words) == 2 else words[0])
    console.print("\n".join(str(p) for p in written))


def cancel(store: JobStore, console: Console, words: list[str]) -> None:
    """``cancel ID...``."""
    if not words:
        raise ShellError("usage: cancel ID...")
    store.cancel(words)
    console.print(f"cancelled {len(words)} job(s)")
