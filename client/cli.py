"""The ``xcloud`` command: one entry point, one subcommand per job.

Every subcommand reads the same configuration (file < XCLOUD_* environment < flags),
configures logging, and turns any ``XcloudError`` into one clear line on stderr. This
module only parses and dispatches: each command imports what runs it (the daemons'
entry modules broker/main.py, coordinator/main.py, coordinator/local_grid.py,
worker/main.py; the client API) inside its function, so the client never loads the
coordinator's store and ``xcloud --help`` stays quick.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from broker.config import Config, load_config
from client.admin_cli import cmd_drain
from schemas.errors import XcloudError

log = logging.getLogger("xcloud")

Command = Callable[[argparse.Namespace, Config], int]


def _lease_and_wait(p: argparse.ArgumentParser) -> None:
    """``--lease`` and ``--wait`` of the commands that reserve a worker for themselves."""
    p.add_argument("--lease", type=float, help="reservation lease in seconds (default 30)")
    p.add_argument("--wait", type=float, nargs="?", const=math.inf, metavar="SECONDS",
                   help="wait for a free worker (at most SECONDS; no value: no limit) "
                   "instead of failing when none is free")


def _common(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """The options every command takes, before the command (``top``) or after it.

    After it they default to SUPPRESS, so that one given before the command is kept.
    """
    g = p.add_argument_group("common options")
    unset: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    g.add_argument("--config", type=Path, help="config file (default $XCLOUD_HOME/config.toml)",
                   **unset)
    g.add_argument("--home", type=Path, help="xcloud home directory (default ~/.xcloud)",
                   **unset)
    g.add_argument("--broker", help="broker URL, e.g. mqtt://127.0.0.1:1883", **unset)
    g.add_argument("--root", help="topic root of the grid (default xcloud)", **unset)
    g.add_argument("-v", "--verbose", action="count",
                   help="more logging: -v shows warnings and progress, -vv debug",
                   **({"default": 0} if top else unset))


def _bus_identity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--principal", "--id", dest="principal", help="principal id to connect as")
    p.add_argument("--token", help="the principal's token (prefer XCLOUD_BUS_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    from schemas.version import __version__

    parser = argparse.ArgumentParser(
        prog="xcloud", description="xcloud: a volunteer / desktop-grid computing platform "
        "over MQTT. Run `xcloud up` to start a grid on this machine. The common options "
        "may come before the command or after it.")
    parser.add_argument("--version", action="version", version=f"xcloud {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("up", help="start broker, coordinator and local workers (Ctrl-C stops)")
    _common(p)
    p.add_argument("--port", type=int, help="MQTT port of the embedded broker (default 1883)")
    p.add_argument("--host", help="address the embedded broker listens on (default 127.0.0.1)")
    p.add_argument("--ws-port", type=int, help="also listen for MQTT over WebSocket here")
    p.add_argument("--workers", type=int, default=2, help="local workers to start (default 2)")
    p.add_argument("--executor", choices=["process", "docker"], default="process",
                   help="executor of the local workers")
    p.add_argument("--db", help="database URL (default sqlite in $XCLOUD_HOME/data)")
    p.add_argument("--http", type=int, metavar="PORT",
                   help="dashboard port (default [monitoring] http_port: 0 = any free port)")
    p.add_argument("--http-host", metavar="ADDR", help="dashboard address (default 127.0.0.1)")
    p.add_argument("--no-http", action="store_true", help="do not serve the dashboard")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("broker", help="run the embedded MQTT broker alone")
    _common(p)
    p.add_argument("--port", type=int, help="MQTT port (default 1883)")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--ws-port", type=int, help="WebSocket port (default: none)")
    p.add_argument("--db", help="database holding the principals (default sqlite in home)")
    p.add_argument("--allow-anonymous", action="store_true", default=None,
                   help="accept connections without credentials (not recommended)")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # xcloud up's own
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("coordinator", help="run the coordinator daemon")
    _common(p)
    _bus_identity(p)
    p.add_argument("--db", help="database URL: sqlite:///path.db or mysql://user:pass@host/db")
    p.add_argument("--embed-broker", action="store_true",
                   help="also run the embedded broker in this process")
    p.add_argument("--port", type=int, help="port of the embedded broker (with --embed-broker)")
    p.add_argument("--host", help="listen address of the embedded broker (with --embed-broker)")
    p.add_argument("--ws-port", type=int,
                   help="WebSocket port of the embedded broker (with --embed-broker)")
    p.add_argument("--allow-anonymous", action="store_true", default=None,
                   help="embedded broker: accept connections without credentials "
                   "(not recommended)")
    p.add_argument("--http", type=int, metavar="PORT",
                   help="serve the dashboard, JSON API and /metrics on PORT (0 = any free port)")
    p.add_argument("--http-host", metavar="ADDR", help="dashboard address (default 127.0.0.1)")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("worker", help="run a worker agent")
    _common(p)
    _bus_identity(p)
    p.add_argument("--name", help="display name (default: the host name)")
    p.add_argument("--description", help="free text shown to users")
    p.add_argument("--tags", help="comma-separated tags, e.g. gpu,fast")
    p.add_argument("--slots", type=int, help="concurrent work items (default 1)")
    p.add_argument("--heartbeat", type=float, help="heartbeat interval in seconds (default 5)")
    p.add_argument("--state-dir", help="where the worker keeps its identity and work dirs")
    p.add_argument("--executor", choices=["process", "docker"], help="executor (default process)")
    p.add_argument("--parent-pid", type=int, metavar="PID",
                   help="stop when process PID, our parent, exits (`xcloud up` passes it)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("workers", help="print the worker table")
    _common(p)
    _bus_identity(p)
    p.add_argument("--state", action="append", help="only workers in this state (repeatable)")
    p.add_argument("--tag", action="append", help="only workers with this tag (repeatable)")
    p.add_argument("--min-cpus", type=int, help="only workers with at least this many cpus")
    p.add_argument("--min-memory", type=_size,
                   help="only workers with at least this much memory (bytes, or 512M, 4G)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_workers)

    p = sub.add_parser("show", help="show one worker in detail")
    _common(p)
    _bus_identity(p)
    p.add_argument("worker", help="worker id, name or listing index (the # of `xcloud workers`)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("drain", help="admin: give a worker no new work (--undo: resume)")
    _common(p)
    _bus_identity(p)
    p.add_argument("worker", help="worker id or name")
    p.add_argument("--undo", action="store_true", help="resume giving it work")
    p.set_defaults(func=cmd_drain)  # client/admin_cli.py, as `xcloud admin drain`

    p = sub.add_parser("shell", help="interactive shell: listWorkers, reserveWorker, output, ...",
                       description="The xcloud shell. Interactive on a terminal; with -c or "
                       "from a pipe it runs the commands and exits with the last remote "
                       "command's status (1 on an error). With -c each argument is one "
                       "command (or several, one per line); a `;` is not a separator but "
                       "part of the remote command line: "
                       "xcloud shell -c 'reserve any' 'output ls | head -3; echo done'")
    _common(p)
    _bus_identity(p)
    p.add_argument("-c", dest="script", metavar="COMMAND", nargs="+", action="extend",
                   help="run these shell commands (one per argument or per line) and exit")
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser("run", help="reserve a worker, run one command on it, release it",
                       description="Reserve a worker, run CMD there with live output, release "
                       "it, and exit with the command's exit status (128+N when killed by "
                       "signal N). One argument is a shell command line (`xcloud run -- "
                       "'ls | wc -l'`); several are quoted as an argument vector.")
    _common(p)
    _bus_identity(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument("-w", "--worker", help="worker id, name or listing index")
    target.add_argument("--any", action="store_true", help="any worker (the default)")
    p.add_argument("--tag", action="append", help="only workers with this tag (repeatable)")
    p.add_argument("--min-cpus", type=int, help="only workers with at least this many cpus")
    p.add_argument("--min-memory", help="only workers with at least this much memory (4G)")
    p.add_argument("--gpus", type=int, metavar="N", help="only workers with N GPUs (that "
                   "match --gpu-memory and --gpu-name)")
    p.add_argument("--gpu-memory", help="only GPUs with at least this much memory (40G)")
    p.add_argument("--gpu-name", help="only GPUs whose name contains this (any case)")
    p.add_argument("--timeout", type=float, help="kill the command after this many seconds")
    _lease_and_wait(p)
    p.add_argument("-t", "--tty", action="store_true",
                   help="run the command on a terminal, like ssh -t (vim, top, python)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...",
                   help="the command to run")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("attach", help="open a terminal (your login shell) on a worker",
                       description="A shell on a pseudo-terminal of WORKER, like ssh: raw "
                       "keys (Ctrl-C, Ctrl-Z, Ctrl-D go to the remote side), window size "
                       "followed, exit status = the shell's. A reservation you hold on "
                       "WORKER (no WORKER: the one you hold) is used and kept; otherwise "
                       "WORKER (no WORKER: any) is reserved for the terminal and released "
                       "when it closes. docs/exec.md, \"Terminal\".")
    _common(p)
    _bus_identity(p)
    p.add_argument("worker", nargs="?", help="worker id, name or listing index")
    p.add_argument("--tag", action="append", help="only workers with this tag (repeatable)")
    _lease_and_wait(p)
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("cp", help="copy files to or from a reserved worker's work directory",
                       description="Copy a file or directory (recursively) between here and "
                       "a worker's work directory; one side is WORKER:PATH (WORKER: an id, "
                       "a name or a listing index; empty: the one reservation you hold). A "
                       "reservation you hold on that worker (in `xcloud shell` or a program) "
                       "is used and kept; otherwise the worker is reserved for the copy "
                       "alone, as `xcloud run` does. Examples: xcloud cp ./in.dat w1:in.dat; "
                       "xcloud cp w1:out ./out. SRC data:REF (a stored data object's name "
                       "or hash) is placed on the worker, which fetches it from the "
                       "coordinator: xcloud cp data:input w1:in.dat")
    _common(p)
    _bus_identity(p)
    p.add_argument("src", metavar="SRC", help="local path, WORKER:PATH or data:REF")
    p.add_argument("dst", metavar="DST", help="local path, or WORKER:PATH")
    p.add_argument("--lease", type=float, help="lease of a reservation made for the copy")
    p.add_argument("--wait", type=float, nargs="?", const=math.inf, metavar="SECONDS",
                   help="wait for the worker to be free (at most SECONDS; no value: no limit)")
    p.set_defaults(func=cmd_cp)

    from client.admin_cli import add_admin_parser  # `xcloud admin ...` (docs/security.md)

    add_admin_parser(sub, _common, _bus_identity)

    from client.data_cli import add_data_parser  # `xcloud data ...` (docs/data.md)

    add_data_parser(sub, _common)

    from client.apps_cli import add_app_parser  # `xcloud app ...` (docs/data.md)

    add_app_parser(sub, _common)

    from client.jobs_cli import add_jobs_parsers  # `xcloud submit`, `jobs` ... (docs/jobs.md)

    add_jobs_parsers(sub, _common)

    from client.why_cli import add_why_parser  # `xcloud why ID` (docs/jobs.md)

    add_why_parser(sub, _common)

    from client.workflow_cli import add_workflow_parser  # `xcloud workflow` (docs/jobs.md)

    add_workflow_parser(sub, _common)
    return parser


# -- helpers ---------------------------------------------------------------------------


def _size(text: str) -> int:
    """An argparse type: ``4G``, ``512MiB`` or plain bytes (as ``run`` and the shell)."""
    from client.shell_syntax import ShellError, parse_bytes

    try:
        return parse_bytes(text)
    except ShellError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _load(args: argparse.Namespace) -> Config:
    if getattr(args, "home", None):
        os.environ["XCLOUD_HOME"] = str(args.home)
    bus: dict[str, Any] = {"url": getattr(args, "broker", None),
                           "root": getattr(args, "root", None),
                           "principal": getattr(args, "principal", None),
                           "token": getattr(args, "token", None)}
    broker = {"port": getattr(args, "port", None), "host": getattr(args, "host", None),
              "ws_port": getattr(args, "ws_port", None),
              "allow_anonymous": getattr(args, "allow_anonymous", None)}
    coordinator = {"db": getattr(args, "db", None)}
    http_port = getattr(args, "http", None)
    monitoring = {"http": True if http_port is not None else None, "http_port": http_port,
                  "http_host": getattr(args, "http_host", None)}
    worker = {"name": getattr(args, "name", None),
              "description": getattr(args, "description", None),
              "tags": getattr(args, "tags", None), "slots": getattr(args, "slots", None),
              "heartbeat_s": getattr(args, "heartbeat", None),
              "state_dir": getattr(args, "state_dir", None),
              "executor": getattr(args, "executor", None)}
    return load_config(args.config, overrides={"bus": bus, "broker": broker,
                                               "coordinator": coordinator, "worker": worker,
                                               "monitoring": monitoring})


DAEMONS = ("up", "broker", "coordinator", "worker")


def _setup_logging(verbose: int, command: str | None) -> None:
    """Daemons log warnings; one-shot commands only errors, unless -v (or
    XCLOUD_LOG_LEVEL): their failure is the one ``xcloud: error:`` line, not a
    warning or two before it (a reconnect, a refused CONNECT) that says less."""
    level_name = os.environ.get("XCLOUD_LOG_LEVEL", "")
    level = getattr(logging, level_name.upper(), None) if level_name else None
    if not isinstance(level, int):
        quiet = logging.WARNING if command in DAEMONS else logging.ERROR
        level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else quiet
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- commands ----------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace, config: Config) -> int:
    from coordinator.local_grid import run_up

    if args.workers < 0:
        raise XcloudError("--workers must be 0 or more")
    if args.verbose == 0:
        logging.getLogger().setLevel(logging.INFO)
        logging.getLogger("amqtt").setLevel(logging.WARNING)
    config.monitoring.http = not args.no_http  # the dashboard comes with `up` by default
    return run_up(config, args.workers, args.executor)


def cmd_broker(args: argparse.Namespace, config: Config) -> int:
    from broker.main import run_broker

    return run_broker(config, parent_pid=getattr(args, "parent_pid", None))


def cmd_coordinator(args: argparse.Namespace, config: Config) -> int:
    from coordinator.main import run_coordinator

    return run_coordinator(config, embed_broker=args.embed_broker)


def cmd_worker(args: argparse.Namespace, config: Config) -> int:
    from worker.main import limit_malloc_arenas, run_worker

    limit_malloc_arenas()  # before the agent's threads: the idle worker's RSS budget
    if not args.verbose and not os.environ.get("XCLOUD_LOG_LEVEL"):
        # The agent's own progress ("worker W online at URL") is what its owner watches for.
        logging.getLogger("worker").setLevel(logging.INFO)
    return run_worker(config, parent_pid=args.parent_pid)


def cmd_workers(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid
    from client.table import workers_table

    tags = [t for tag in args.tag or [] for t in tag.split(",") if t] or None
    states = [s for state in args.state or [] for s in state.split(",") if s] or None
    with Grid.connect(config) as grid:
        rows = grid.workers(state=states, tags=tags, min_cpus=args.min_cpus,
                            min_memory_bytes=args.min_memory)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
    else:
        print(workers_table(rows))
    return 0


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid
    from client.table import worker_detail

    target: str | int = int(args.worker) if args.worker.isdigit() else args.worker
    with Grid.connect(config) as grid:
        info = grid.worker(target)
    print(json.dumps(info.__dict__, indent=2) if args.json else worker_detail(info))
    return 0


def cmd_shell(args: argparse.Namespace, config: Config) -> int:
    from client.shell import run_shell

    return run_shell(config, args.script)


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    import shlex

    from client.shell import ShellError, parse_bytes, run_once

    words = list(args.cmd)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        print("xcloud run: error: no command given (xcloud run [options] -- CMD...)",
              file=sys.stderr)
        return 2
    command = words[0] if len(words) == 1 else shlex.join(words)
    requirements: dict[str, Any] = {}
    if args.tag:
        requirements["tags"] = [t for tag in args.tag for t in tag.split(",") if t]
    if args.min_cpus is not None:
        requirements["min_cpus"] = args.min_cpus
    for key, value in (("gpus", args.gpus), ("gpu_name", args.gpu_name)):
        if value:
            requirements[key] = value
    for flag, key, text in (("--min-memory", "min_memory_bytes", args.min_memory),
                            ("--gpu-memory", "gpu_memory_bytes", args.gpu_memory)):
        if text is None:
            continue
        try:
            requirements[key] = parse_bytes(text)
        except ShellError as err:
            print(f"xcloud run: error: {flag}: {err}", file=sys.stderr)
            return 2
    if args.worker and requirements:
        print("xcloud run: error: give either --worker or requirements (--tag, --min-cpus, "
              "--min-memory)", file=sys.stderr)
        return 2
    if args.tty:  # client/terminal.py: raw keys in, terminal bytes out
        from client.terminal import attach

        return attach(config, args.worker, requirements=requirements, lease_s=args.lease,
                      wait=args.wait, command=command, reserve=True, timeout=args.timeout)
    # Piped input flows to the command, as with ssh; from a terminal it reads EOF.
    piped = sys.stdin is not None and not sys.stdin.isatty()
    return run_once(config, command, worker=args.worker, requirements=requirements,
                    timeout=args.timeout, lease_s=args.lease, wait=args.wait,
                    stdin_fd=sys.stdin.fileno() if piped else None)


def cmd_attach(args: argparse.Namespace, config: Config) -> int:
    from client.terminal import attach

    tags = [t for tag in args.tag or () for t in tag.split(",") if t]
    return attach(config, args.worker, requirements={"tags": tags} if tags else None,
                  lease_s=args.lease, wait=args.wait)


def cmd_cp(args: argparse.Namespace, config: Config) -> int:
    from client.file_copy import run_cp

    return run_cp(config, args.src, args.dst, wait=args.wait, lease_s=args.lease)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command | None = getattr(args, "func", None)
    if func is None:
        # `xcloud`, `xcloud admin` or `xcloud admin principal` without an action
        parser.parse_args([*(argv or sys.argv[1:]), "--help"])
        return 2
    _setup_logging(getattr(args, "verbose", 0) or 0, getattr(args, "command", None))
    try:
        return func(args, _load(args))
    except XcloudError as err:
        print(f"xcloud: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `xcloud workers | head`: the reader left, as with any tool
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return 128 + 13  # SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
