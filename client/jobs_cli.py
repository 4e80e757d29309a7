"""``xcloud submit``, ``jobs``, ``job show``, ``logs``, ``wait``, ``results``, ``cancel``,
``hold``, ``release`` (docs/jobs.md, "Using jobs").

client/cli.py calls ``add_jobs_parsers``; what runs the commands imports the client API
inside, so ``xcloud --help`` stays quick. ``xcloud logs ID -f`` prints a running job's
output as it comes (``grid.jobs.follow``: stdout to stdout, stderr to stderr), then the
rest once it ended; Ctrl-C stops the following, never the job.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.cli_options import identity_options

if TYPE_CHECKING:
    from broker.config import Config
    from client.jobs import JobResult

AddOptions = Callable[[argparse.ArgumentParser], None]
SWEEP_MAX = 100_000


def add_jobs_parsers(sub: Any, common: AddOptions) -> None:
    """The job verbs under the top-level subparsers ``sub``."""

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
        common(p)
        identity_options(p)
        return p

    p = verb("submit", "submit batch jobs: xcloud submit [options] -- COMMAND [ARG...], "
             "or xcloud submit --app [OWNER/]NAME[@VERSION] [options] [ARG...]")
    p.add_argument("--app", metavar="[OWNER/]NAME[@VERSION]",
                   help="run this registered application (`xcloud app list`) with the "
                   "arguments instead of a command")
    many = p.add_mutually_exclusive_group()
    many.add_argument("--count", type=int, default=1, metavar="N",
                      help="N jobs; each sees its index in XCLOUD_JOB_INDEX")
    many.add_argument("--sweep", metavar="FILE",
                      help="one job per non-empty line of FILE: the line is in XCLOUD_SWEEP "
                      "and replaces {} in the command (shell-quoted)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=PATH|SHA256",
                   help="a file in the job's work dir (a local file is uploaded first); "
                   "repeatable; PATH alone keeps its file name")
    p.add_argument("--output", action="append", default=[], metavar="GLOB",
                   help="files to collect after the run (repeatable)")
    p.add_argument("--stdin", metavar="PATH|SHA256", help="the job's standard input")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="an environment variable (repeatable)")
    p.add_argument("--cpus", type=int, help="cpus the job needs (default 1)")
    p.add_argument("--memory", help="memory limit, e.g. 512M, 4G")
    p.add_argument("--gpus", type=int, metavar="N", help="GPUs the job needs (0-16, default 0)")
    p.add_argument("--gpu-memory", metavar="SIZE",
                   help="only GPUs with at least this much memory, e.g. 40G")
    p.add_argument("--gpu-name", metavar="TEXT",
                   help="only GPUs whose name contains TEXT (any case), e.g. H100")
    p.add_argument("--wall", help="wall-clock limit, e.g. 90s, 10m, 1h")
    p.add_argument("--retries", type=int, help="retries of the job's own failures (default 0)")
    p.add_argument("--system-retries", type=int,
                   help="retries after worker loss and the like (default 3)")
    p.add_argument("--stop-exit-code", type=int, action="append", default=[],
                   metavar="CODE", help="an exit code that ends retrying (repeatable)")
    p.add_argument("--priority", type=int, help="-1000..1000, higher runs first")
    p.add_argument("--label", action="append", default=[], metavar="K=V",
                   help="a label (repeatable)")
    p.add_argument("--tag", action="append", default=[], help="run only on workers with "
                   "this tag (repeatable)")
    p.add_argument("--executor", choices=["process", "docker"])
    p.add_argument("--image", help="docker image (docker executor)")
    p.add_argument("--worker", help="run on this worker only")
    p.add_argument("--name", help="the job's name")
    p.add_argument("--after", action="append", default=[], metavar="ID[,ID...]",
                   help="run only after these jobs completed (repeatable)")
    p.add_argument("--after-policy", choices=["hold", "cancel"],
                   help="if a job in --after fails: hold this one (default) or cancel it")
    p.add_argument("--replicas", type=int, metavar="N",
                   help="run N attempts on distinct workers (1-16, default 1)")
    p.add_argument("--quorum", type=int, metavar="K",
                   help="complete when K replicas' results agree (1-N, default 1)")
    p.add_argument("--max-replica-attempts", type=int, metavar="M",
                   help="attempts a replicated job may spend (default N + 2K, at most 64)")
    p.add_argument("--adaptive", type=int, metavar="M", dest="adaptive_after",
                   help="a replicated job may run alone on a worker with M valid results "
                   "and no invalid one")
    p.add_argument("--wait", action="store_true", help="wait for the jobs to end")
    p.add_argument("--json", action="store_true", help="print the ids as JSON")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND | ARG")
    p.set_defaults(func=cmd_submit)

    p = verb("jobs", "list your jobs (like condor_q)")
    p.add_argument("--state", choices=["queued", "running", "held", "completed", "failed",
                                       "cancelled"])
    p.add_argument("--batch", help="only this batch (b-...)")
    p.add_argument("--owner", help="admins: this principal's jobs")
    p.add_argument("--limit", type=int, default=1000, help="at most this many (1000)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true",
                   help="print job events live, one line each, until Ctrl-C")
    p.add_argument("--all", action="store_true",
                   help="with --watch, admins: every principal's jobs")
    p.add_argument("--summary", action="store_true",
                   help="per principal: jobs by state, busy slots, weight and share "
                   "(a client sees its own line and the totals)")
    p.set_defaults(func=cmd_jobs)

    p = verb("job", "one job: xcloud job show ID")
    jsub = p.add_subparsers(dest="job_command", metavar="JOB_COMMAND")
    q: argparse.ArgumentParser = jsub.add_parser("show", help="a job, its attempts and "
                                                 "their timeline")
    common(q)
    q.add_argument("job", metavar="ID")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_job_show)

    p = verb("logs", "print a job's stdout and stderr (-f: live while it runs)")
    p.add_argument("job", metavar="ID")
    p.add_argument("-f", "--follow", action="store_true",
                   help="print the output while the job runs, until it ends (Ctrl-C stops "
                        "following, not the job)")
    p.set_defaults(func=cmd_logs)

    p = verb("wait", "wait for jobs to end; exit 0 when all completed with exit 0")
    p.add_argument("jobs", nargs="*", metavar="ID")
    p.add_argument("--all", action="store_true", help="all your queued and running jobs")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    p.set_defaults(func=cmd_wait)

    p = verb("results", "write a job's stdout, stderr and outputs into a directory")
    p.add_argument("job", metavar="ID")
    p.add_argument("-o", "--output", metavar="DIR", help="default: ./ID")
    p.set_defaults(func=cmd_results)

    for name, help in (("cancel", "cancel jobs (running ones are killed)"),
                       ("hold", "hold jobs (running ones are stopped and wait)"),
                       ("release", "release held jobs")):
        p = verb(name, help)
        p.add_argument("jobs", nargs="+", metavar="ID")
        if name == "hold":
            p.add_argument("--reason", help="why (shown in `xcloud jobs` and `job show`)")
        p.set_defaults(func=cmd_control, action=name)


# -- submit ------------------------------------------------------------------------------


def _pairs(items: list[str], what: str) -> dict[str, str]:
    from client.errors import InvalidRequest

    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"{what} must be K=V, not {item!r}")
        out[key] = value
    return out


def _inputs(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            name, value = Path(item).name, item
        out[name] = value
    return out


def _command(words: list[str]) -> str:
    from client.errors import InvalidRequest

    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise InvalidRequest("give the command after --: xcloud submit -- COMMAND")
    return words[0] if len(words) == 1 else shlex.join(words)


def _app(text: str, words: list[str]) -> dict[str, Any]:
    """``--app [OWNER/]NAME[@VERSION]`` and its arguments: the spec options for an app."""
    from client.errors import InvalidRequest

    owner, _, rest = text.rpartition("/")
    name, _, version = rest.partition("@")
    if not name or (text.endswith("@")):
        raise InvalidRequest(f"--app is [OWNER/]NAME[@VERSION], not {text!r}")
    return {"app": name, "app_version": version or None, "app_owner": owner or None,
            "args": words[1:] if words[:1] == ["--"] else words}


def _sweep_lines(path: str) -> list[str]:
    from client.errors import InvalidRequest

    try:
        lines = [line.rstrip("\n") for line in Path(path).read_text().splitlines()]
    except OSError as err:
        raise InvalidRequest(f"cannot read {path}: {err.strerror or err}") from err
    lines = [line for line in lines if line.strip()]
    if not lines or len(lines) > SWEEP_MAX:
        raise InvalidRequest(f"a sweep file has 1 to {SWEEP_MAX} non-empty lines")
    return lines


def cmd_submit(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid
    from client.errors import InvalidRequest

    app = _app(args.app, list(args.command)) if args.app else None
    command = None if app else _command(list(args.command))
    if args.count < 1 or args.count > SWEEP_MAX:
        raise InvalidRequest(f"--count is 1 to {SWEEP_MAX}")
    env = _pairs(args.env, "--env")
    options: dict[str, Any] = {
        "inputs": _inputs(args.input), "outputs": args.output, "stdin": args.stdin,
        "cpus": args.cpus, "memory": args.memory, "wall": args.wall,
        "retries": args.retries, "system_retries": args.system_retries,
        "stop_exit_codes": args.stop_exit_code, "priority": args.priority,
        "labels": _pairs(args.label, "--label"), "tags": args.tag,
        "executor": args.executor, "image": args.image, "worker": args.worker,
        "name": args.name, "gpus": args.gpus, "gpu_memory": args.gpu_memory,
        "gpu_name": args.gpu_name,
        "after": [j.strip() for item in args.after for j in item.split(",") if j.strip()],
        "after_policy": args.after_policy, "replicas": args.replicas,
        "quorum": args.quorum, "max_replica_attempts": args.max_replica_attempts,
        "adaptive_after": args.adaptive_after}
    with Grid.connect(config) as grid:
        base = grid.jobs.spec(command, env=env, **options, **(app or {}))  # uploads once
        specs: list[dict[str, Any]] = []
        if args.sweep:
            for index, line in enumerate(_sweep_lines(args.sweep)):
                spec = dict(base, index=index, env={**env, "XCLOUD_SWEEP": line})
                if command is not None:
                    spec["command"] = command.replace("{}", shlex.quote(line))
                elif base.get("args"):  # an app's arguments: quoted by the coordinator
                    spec["args"] = [a.replace("{}", line) for a in base["args"]]
                specs.append(spec)
        else:
            specs = [dict(base, index=i) for i in range(args.count)]
        futures = grid.jobs.submit_specs(specs)
        ids = [f.job for f in futures]
        if args.json:
            print(json.dumps(ids))
        else:
            for job in ids:
                print(job)
        print(f"submitted {len(ids)} job(s)", file=sys.stderr)
        for warning in grid.jobs.last_warnings:
            print(f"warning: job {warning.get('job')} {warning.get('message')}",
                  file=sys.stderr)
        if not args.wait:
            return 0
        results = [f.result() for f in futures]
    return 0 if all(r.ok for r in results) else 1


# -- looking -----------------------------------------------------------------------------


def _when(ts: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(float(ts))) if ts else "-"


def jobs_table(items: list[dict[str, Any]]) -> str:
    from client.table import render

    rows = [[str(j["id"]), str(j.get("name") or "")[:30], str(j["state"]),
             str(j.get("worker") or "-"), str(j.get("attempts") or 0),
             "-" if j.get("exit_code") is None else str(j["exit_code"]),
             _when(j.get("submitted_at")), _when(j.get("ended_at")),
             str(j.get("hold_reason") or "")[:40]] for j in items]
    return render(["ID", "NAME", "STATE", "WORKER", "TRIES", "EXIT", "SUBMITTED", "ENDED",
                   "HOLD"], rows)


def cmd_jobs(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid
    from client.errors import InvalidRequest

    if args.all and not args.watch:
        raise InvalidRequest("--all goes with --watch (to list everyone's jobs, an admin "
                             "runs `xcloud jobs` alone)")
    if args.summary and (args.watch or args.state or args.batch or args.owner):
        raise InvalidRequest("--summary goes alone (with --json at most)")
    with Grid.connect(config) as grid:
        if args.summary:  # client/jobs_summary.py
            from client.jobs_summary import summary, summary_text

            reply = summary(grid)
            print(json.dumps(reply, indent=2) if args.json else summary_text(reply))
            return 0
        if args.watch:
            return _watch(grid, everyone=args.all, as_json=args.json)
        items = grid.jobs.ls(state=args.state, batch=args.batch, owner=args.owner,
                             limit=args.limit)
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    print(jobs_table(items))
    counts: dict[str, int] = {}
    for item in items:
        counts[str(item["state"])] = counts.get(str(item["state"]), 0) + 1
    print(f"\n{len(items)} job(s)" + ("; " if counts else "")
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


def _watch(grid: Any, *, everyone: bool, as_json: bool) -> int:
    """``jobs --watch``: one line (or JSON object) per event until Ctrl-C (exit 130)."""
    import dataclasses

    from client.job_watch import event_line

    watch = grid.jobs.watch(all=everyone)
    print("watching " + ("every job's" if everyone else "your jobs'")
          + " events; Ctrl-C stops", file=sys.stderr)
    try:
        for event in watch:
            print(json.dumps(dataclasses.asdict(event)) if as_json else event_line(event),
                  flush=True)
    except KeyboardInterrupt:
        return 130
    finally:
        watch.close()
    return 0


def cmd_job_show(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    with Grid.connect(config) as grid:
        reply = grid.jobs.show(args.job)
    if args.json:
        print(json.dumps({"job": reply.job, "attempts": reply.attempts}, indent=2))
        return 0
    print(job_detail(reply))
    return 0


def job_detail(reply: Any) -> str:
    """``job show``'s text (the CLI's and the shell's): the job, then its attempts."""
    from client.table import render

    job = reply.job
    spec = job.get("spec") or {}
    results = job.get("results") or {}
    lines = [f"job       {job['id']}  {job.get('name') or ''}".rstrip(),
             f"state     {job['state']}" + (f" ({job['hold_reason']})"
                                             if job.get("hold_reason") else ""),
             f"owner     {job['owner']}   batch {job.get('batch') or '-'}",
             f"command   {str(spec.get('command', ''))[:200]}",
             f"submitted {_when(job.get('submitted_at'))}   ended {_when(job.get('ended_at'))}",
             f"exit      {'-' if results.get('exit_code') is None else results['exit_code']}"]
    if results.get("outputs"):
        lines.append("outputs   " + ", ".join(f"{o['name']} ({o['size']} B)"
                                             for o in results["outputs"]))
    if reply.attempts:
        rows = [[str(a["id"]), str(a.get("worker") or "-"), str(a["kind"]),
                 _when(a.get("assigned_at")), _when(a.get("started_at")),
                 _when(a.get("ended_at")),
                 "-" if a.get("exit_code") is None else str(a["exit_code"]),
                 str(a.get("error") or "")[:60]] for a in reply.attempts]
        lines += ["", render(["ATTEMPT", "WORKER", "OUTCOME", "ASSIGNED", "STARTED", "ENDED",
                              "EXIT", "ERROR"], rows)]
    return "\n".join(lines)


def _finished(grid: Any, job: str, follow: bool) -> JobResult:
    from client.errors import InvalidRequest
    from schemas.job_messages import TERMINAL_JOB_STATES

    result: JobResult = grid.jobs.result(job)
    if result.state in TERMINAL_JOB_STATES:
        return result
    if not follow:
        raise InvalidRequest(f"job {job} is {result.state}: its output is there once it "
                             "ends (-f prints it live)")
    ended: JobResult = grid.jobs.wait([job])[0]
    return ended


def cmd_logs(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    with Grid.connect(config) as grid:
        if args.follow:
            return _follow(grid, args.job)
        result = _finished(grid, args.job, args.follow)
        sys.stdout.buffer.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(result.stderr)
        sys.stderr.flush()
    return 0


def _follow(grid: Any, job: str) -> int:
    """``logs -f``: live output; Ctrl-C stops the following only (exit 130)."""
    try:
        for stream, data in grid.jobs.follow(job):
            out = sys.stderr if stream == "stderr" else sys.stdout
            out.buffer.write(data)
            out.flush()
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f"\nstopped following job {job} (it goes on)", file=sys.stderr)
        return 130
    return 0


def cmd_wait(args: argparse.Namespace, config: Config) -> int:
    import concurrent.futures as cf

    from client.api import Grid
    from client.errors import InvalidRequest

    if not args.jobs and not args.all:
        raise InvalidRequest("name the jobs to wait for, or --all")
    with Grid.connect(config) as grid:
        jobs = list(args.jobs)
        if args.all:
            for state in ("queued", "running"):
                jobs += [str(j["id"]) for j in grid.jobs.ls(state=state)]
        try:
            results = grid.jobs.wait(dict.fromkeys(jobs), timeout=args.timeout)
        except cf.TimeoutError as err:
            print(f"xcloud: {err}", file=sys.stderr)
            return 2
    for result in results:
        code = "-" if result.exit_code is None else result.exit_code
        print(f"{result.job}  {result.state}  exit {code}")
    return 0 if all(r.ok for r in results) else 1


def cmd_results(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid
    from client.errors import InvalidRequest
    from schemas.job_messages import TERMINAL_JOB_STATES

    with Grid.connect(config) as grid:
        result = grid.jobs.result(args.job)
        if result.state not in TERMINAL_JOB_STATES:
            raise InvalidRequest(f"job {args.job} is {result.state}: no results yet")
        written = result.save(args.output or args.job)
    for path in written:
        print(path)
    return 0


def cmd_control(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    with Grid.connect(config) as grid:
        store = grid.jobs
        call = {"cancel": store.cancel, "hold": store.hold, "release": store.release}
        if args.action == "hold" and args.reason:
            detail = store.hold(list(args.jobs), reason=args.reason)
        else:
            detail = call[args.action](list(args.jobs))
    extra = ", ".join(f"{k} {v}" for k, v in sorted(detail.items()))
    print(f"{args.action}: {len(args.jobs)} job(s)" + (f" ({extra})" if extra else ""))
    return 0
