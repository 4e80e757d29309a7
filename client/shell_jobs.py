"""The shell's batch-job verbs: ``submit``, ``jobs``, ``wait``, ``results``, ``cancel``
(docs/jobs.md). No worker needs to be reserved: they talk to the coordinator through
``grid.jobs`` (client/jobs.py), like ``xcloud submit`` and friends.

    submit [--count N] [--input NAME=PATH ...] [--output GLOB ...] [--wall 10m] -- CMD
    submit --app NAME[@VERSION] [OPTIONS] [-- ARG...]
    jobs [STATE] | jobs --watch [--all]
    wait ID... | --all
    results ID [DIR]
    cancel ID...
    job show ID
    logs ID [-f]          (ID a job's, j-...; the shell's own `logs` takes exec ids too)
    hold ID... [--reason R]
    release ID...         (with no ID, `release` gives the reserved worker back)
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Any, NoReturn

from client.shell_syntax import ShellError

if TYPE_CHECKING:
    from client.console import Console
    from client.jobs import JobStore

SUBMIT_USAGE = ("submit [--count N] [--input NAME=PATH|SHA256 ...] [--output GLOB ...] "
                "[--wall 10m] [--memory 1G] [--cpus N] [--env K=V ...] "
                "[--after ID[,ID...]] [--after-policy hold|cancel] "
                "[--replicas N --quorum K] -- CMD, or submit --app NAME[@VERSION] "
                "[OPTIONS] [-- ARG...]")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ShellError(f"{message}; usage: {SUBMIT_USAGE}")


def _submit_parser() -> _Parser:
    p = _Parser(prog="submit", add_help=False)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--app")
    p.add_argument("--input", action="append", default=[])
    p.add_argument("--output", action="append", default=[])
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--wall")
    p.add_argument("--memory")
    p.add_argument("--cpus", type=int)
    p.add_argument("--after", action="append", default=[])
    p.add_argument("--after-policy", choices=["hold", "cancel"])
    p.add_argument("--replicas", type=int)
    p.add_argument("--quorum", type=int)
    p.add_argument("--max-replica-attempts", type=int)
    p.add_argument("command", nargs=argparse.REMAINDER)
    return p


def submit(store: JobStore, console: Console, rest: str) -> list[str]:
    """``submit OPTIONS -- CMD``: CMD is everything after `` -- ``, as typed (a shell
    command line: ``$VARS`` expand on the worker). Prints and returns the new job ids."""
    import shlex

    from client.jobs_cli import _app, _inputs, _pairs

    options, sep, command = f" {rest}".partition(" -- ")
    try:
        words = shlex.split(options)
        args = _submit_parser().parse_args(words)
        # --app NAME[@VERSION]: what follows -- are its arguments (split like a shell's)
        app = _app(args.app, shlex.split(command)) if args.app else {}
    except ValueError as err:
        raise ShellError(str(err)) from None
    if not app and (not sep or not command.strip()):
        raise ShellError(f"usage: {SUBMIT_USAGE}")
    if args.command:
        raise ShellError(f"unexpected {args.command[0]!r} before --; usage: {SUBMIT_USAGE}")
    if not 1 <= args.count <= 100_000:
        raise ShellError("--count is 1 to 100000")
    base = store.spec(None if app else command.strip(), **app,
                      inputs=_inputs(args.input), outputs=args.output,
                      env=_pairs(args.env, "--env"), wall=args.wall, memory=args.memory,
                      cpus=args.cpus,
                      after=[j.strip() for item in args.after for j in item.split(",")
                             if j.strip()],
                      after_policy=args.after_policy, replicas=args.replicas,
                      quorum=args.quorum, max_replica_attempts=args.max_replica_attempts)
    futures = store.submit_specs([dict(base, index=i) for i in range(args.count)])
    ids = [f.job for f in futures]
    console.print("\n".join(ids) if len(ids) <= 20 else
                  f"{ids[0]} … {ids[-1]}")
    console.print(f"submitted {len(ids)} job(s)")
    return ids


def jobs(store: JobStore, console: Console, words: list[str]) -> None:
    """``jobs [STATE]``: the condor_q-like table; ``jobs --watch [--all]``: events live."""
    from client.jobs_cli import jobs_table

    if "--watch" in words:
        watch(store, console, words)
        return
    if len(words) > 1:
        raise ShellError("usage: jobs [queued|running|held|completed|failed|cancelled] | "
                         "jobs --watch [--all]")
    items = store.ls(state=words[0] if words else None, limit=1000)
    console.print(jobs_table(items) if items else "no jobs (submit some with `submit`)")


def watch(store: JobStore, console: Console, words: list[str]) -> None:
    """``jobs --watch [--all]``: job events, one line each, until Ctrl-C (which stops the
    watching only); ``--all``: every principal's (admins)."""
    from client.job_watch import event_line

    if set(words) - {"--watch", "--all"}:
        raise ShellError("usage: jobs --watch [--all]")
    everyone = "--all" in words
    events = store.watch(all=everyone)
    console.dim("watching " + ("every job's" if everyone else "your jobs'")
                + " events; Ctrl-C stops")
    try:
        for event in events:
            console.print(event_line(event))
    except KeyboardInterrupt:
        console.dim("[stopped watching]")
    finally:
        events.close()


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


# -- job show, logs, hold, release: the CLI's verbs at the prompt -----------------------

_JOB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def is_job_id(word: str) -> bool:
    """Job ids are ``j-`` and hex (exec ids, which ``logs`` also takes, are bare hex)."""
    return word.startswith("j-")


def _job_ids(words: list[str], usage: str) -> list[str]:
    if not words:
        raise ShellError(f"usage: {usage}")
    for word in words:
        if word.startswith("-"):
            raise ShellError(f"unknown option {word!r}; usage: {usage}")
        if not _JOB_ID.match(word):
            raise ShellError(f"not a job id: {word!r} (job ids look like j-0123456789abcdef)")
    return list(dict.fromkeys(words))


def show(store: JobStore, console: Console, words: list[str]) -> None:
    """``job show ID``: the job, its attempts and their timeline, as ``xcloud job show``
    renders them (client/jobs_cli.py ``job_detail``)."""
    from client.jobs_cli import job_detail

    if len(words) != 2 or words[0] != "show":
        raise ShellError("usage: job show ID")
    console.print(job_detail(store.show(_job_ids(words[1:], "job show ID")[0])))


def logs(store: JobStore, console: Console, words: list[str]) -> None:
    """``logs ID [-f]``: an ended job's stdout and stderr; ``-f`` follows a running one
    live until it ends. Ctrl-C stops the following only: the job and the shell go on."""
    from client.exec_stream import OutputChunk
    from schemas.job_messages import TERMINAL_JOB_STATES

    follow = any(w in ("-f", "--follow") for w in words)
    job = _job_ids([w for w in words if w not in ("-f", "--follow")], "logs ID [-f]")
    if len(job) != 1:
        raise ShellError("usage: logs ID [-f]")
    if not follow:
        result = store.result(job[0])
        if result.state not in TERMINAL_JOB_STATES:
            raise ShellError(f"job {job[0]} is {result.state}: its output is there once it "
                             f"ends (`logs {job[0]} -f` follows it live)")
        for stream, data in (("stdout", result.stdout), ("stderr", result.stderr)):
            console.write_chunk(OutputChunk(stream, data))
        console.end_line()
        return
    try:
        for stream, data in store.follow(job[0]):
            console.write_chunk(OutputChunk(stream, data))
    except KeyboardInterrupt:
        console.end_line(force=True)
        console.dim(f"[stopped following job {job[0]}; it goes on]")
        return
    console.end_line()
    ended = store.show(job[0]).job
    code = (ended.get("results") or {}).get("exit_code")
    console.dim(f"[job {job[0]} {ended['state']}" + ("" if code is None else f", exit {code}")
                + "]")


def _control(console: Console, action: str, ids: list[str], detail: dict[str, Any]) -> None:
    extra = ", ".join(f"{k} {v}" for k, v in sorted(detail.items()))
    console.print(f"{action}: {len(ids)} job(s)" + (f" ({extra})" if extra else ""))


def hold(store: JobStore, console: Console, words: list[str]) -> None:
    """``hold ID... [--reason R]``: held jobs wait (a running one is stopped first)."""
    usage = "hold ID... [--reason R]"
    reason: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--reason" or word.startswith("--reason="):
            if "=" in word:
                reason = word.partition("=")[2]
            elif i < len(words):
                reason, i = words[i], i + 1
            else:
                raise ShellError(f"--reason needs a value; usage: {usage}")
            continue
        rest.append(word)
    if reason is not None and not 1 <= len(reason.strip()) <= 1024:
        raise ShellError("--reason is 1 to 1024 characters")
    ids = _job_ids(rest, usage)
    _control(console, "hold", ids, store.hold(ids, reason=reason))


def release(store: JobStore, console: Console, words: list[str]) -> None:
    """``release ID...``: held jobs are queued again."""
    ids = _job_ids(words, "release ID... (jobs) | release (your worker)")
    _control(console, "release", ids, store.release(ids))


def why(store: JobStore, console: Console, words: list[str]) -> None:
    """``why ID``: why a batch job is not running, as ``xcloud why`` prints it."""
    from client.why_cli import why_text

    if len(words) != 1:
        raise ShellError("usage: why ID")
    console.print(why_text(store.why(_job_ids(words, "why ID")[0])))
