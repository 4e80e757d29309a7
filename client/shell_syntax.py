"""The shell's language: its command table and the parsing of what is typed.

Pure functions (no bus, no terminal, no prompt_toolkit), shared by the command
interpreter (:mod:`client.shell_commands`), the completer and ``xcloud run``'s option
parsing, and testable on their own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from client.errors import ClientError


class ShellError(ClientError):
    """Bad usage of a shell command."""


class ShellExit(Exception):
    """``exit`` / ``quit``."""


@dataclass(frozen=True)
class CommandSpec:
    name: str
    aliases: tuple[str, ...]
    usage: str
    help: str


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("listWorkers", ("workers", "ls"), "listWorkers",
                "list the grid's workers; # is the index reserveWorker takes"),
    CommandSpec("reserveWorker", ("reserve",),
                "reserveWorker N|ID|NAME|any [--tag T] [--min-cpus N] [--min-memory B] "
                "[--os OS] [--arch ARCH] [--executor E] [--image I] [--lease S] "
                "[--wait [S]]",
                "reserve a worker: index N of the listing, an id or name, or any match; "
                "--wait: until one is free"),
    CommandSpec("myWorker", ("mine",), "myWorker", "show the worker you hold"),
    CommandSpec("output", ("run",), "output CMD",
                "run CMD on your worker and show its output live (Ctrl-C interrupts it)"),
    CommandSpec("term", ("attach",), "term [CMD]",
                "a terminal on your worker: your login shell there (or CMD, like ssh -t); "
                "its exit brings you back here"),
    CommandSpec("start", ("bg",), "start CMD", "run CMD in the background; prints its id"),
    CommandSpec("ps", (), "ps", "commands started on your worker"),
    CommandSpec("logs", (), "logs ID [-f]",
                "output kept for a command, or a batch job's (ID j-...); -f follows it"),
    CommandSpec("kill", (), "kill ID [SIGNAL]", "signal a command (default TERM)"),
    CommandSpec("put", (), "put LOCAL [REMOTE]",
                "copy a local file or directory into your worker's work directory; "
                "put data:REF [REMOTE] places a stored data object (name or hash) there"),
    CommandSpec("get", (), "get REMOTE [LOCAL]",
                "copy a file or directory of your worker's work directory here"),
    CommandSpec("data", (), "data put|get|ls|show|rm|pin|unpin ...",
                "the coordinator's data objects, no worker needed: put FILE [NAME], "
                "get KEY [PATH], ls, show KEY, rm KEY, pin KEY, unpin KEY (KEY: a name, "
                "a hash or a prefix of 8+ hex digits)"),
    CommandSpec("submit", (), "submit [--count N] [--input NAME=PATH ...] [--output GLOB ...] "
                "[--wall 10m] [--memory 1G] [--cpus N] [--env K=V ...] "
                "[--after ID,...] [--after-policy hold|cancel] -- CMD",
                "submit CMD as batch job(s), no worker needed (docs/jobs.md)"),
    CommandSpec("jobs", (), "jobs [STATE] | jobs --watch [--all]",
                "your batch jobs (like condor_q); --watch: their events live until Ctrl-C "
                "(--all: everyone's, admins)"),
    CommandSpec("wait", (), "wait ID... | --all", "wait for batch jobs to end"),
    CommandSpec("results", (), "results ID [DIR]",
                "write a job's stdout, stderr and outputs into DIR (default ./ID)"),
    CommandSpec("cancel", (), "cancel ID...", "cancel batch jobs (running ones are killed)"),
    CommandSpec("job", (), "job show ID",
                "a batch job, its attempts and their timeline (as `xcloud job show`)"),
    CommandSpec("hold", (), "hold ID... [--reason R]",
                "hold batch jobs (running ones are stopped and wait)"),
    CommandSpec("why", (), "why ID",
                "why a batch job is not running (its requirements against the workers)"),
    CommandSpec("release", ("releaseWorker",), "release [ID...]",
                "give your worker back; with job ids: release held batch jobs"),
    CommandSpec("help", ("?",), "help [COMMAND]", "this list, or one command's usage"),
    CommandSpec("exit", ("quit",), "exit", "leave (releases your worker)"),
)
_BY_NAME: dict[str, CommandSpec] = {}
for _spec in COMMANDS:
    for _n in (_spec.name, *_spec.aliases):
        _BY_NAME[_n.lower()] = _spec


def command_names() -> list[str]:
    return [n for spec in COMMANDS for n in (spec.name, *spec.aliases)]


def find_command(word: str) -> CommandSpec | None:
    """The command a name or alias stands for (case-insensitive); None when unknown."""
    return _BY_NAME.get(word.lower())


def split_script(text: str) -> list[str]:
    """Split a script into commands: one per line (newlines outside quotes).

    ``;`` never separates commands: it belongs to the remote command line, so
    ``output ls | head -3; echo done`` is one command, as when typed at the prompt.
    A newline inside quotes stays in the command; a backslash escapes one character.
    Quotes and backslashes are kept as typed, since the remote shell parses them again.
    Blank lines and ``#`` comments are skipped.
    """
    parts: list[str] = []
    buf: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quote != "'" and i + 1 < len(text):
            buf.append(text[i:i + 2])
            i += 2
            continue
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "\n":
            parts.append("".join(buf))
            buf = []
            i += 1
            continue
        buf.append(ch)
        i += 1
    if quote:
        raise ShellError(f"unterminated {quote} quote")
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip() and not p.strip().startswith("#")]


def script_commands(scripts: list[str]) -> list[str]:
    """``xcloud shell -c CMD [CMD ...]``: each argument is one or more lines."""
    return [command for script in scripts for command in split_script(script)]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``4G``, ``512MiB``, ``1000000`` -> bytes (K/M/G/T are binary multiples)."""
    m = _SIZE.match(text)
    if not m:
        raise ShellError(f"not a size: {text!r} (e.g. 512M, 4G)")
    factor = 1024 ** " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * factor)


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def reserve_args(words: list[str]) -> tuple[str | int | None, dict[str, Any], dict[str, Any]]:
    """``reserveWorker`` arguments -> (target, any-requirements, extra reserve kwargs).

    ``--wait [SECONDS]`` takes an optional value: without one it waits with no limit.
    """
    target: str | int | None = None
    req: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("--"):
            if target is not None:
                raise ShellError(f"unexpected argument {word!r}")
            target = int(word) if word.isdigit() else word
            continue
        key, eq, value = word[2:].partition("=")
        if not eq:
            if key == "wait" and (i >= len(words) or not _is_number(words[i])):
                extra["wait"] = math.inf
                continue
            if i >= len(words):
                raise ShellError(f"--{key} needs a value")
            value = words[i]
            i += 1
        try:
            if key in ("tag", "tags"):
                req.setdefault("tags", []).extend(t for t in value.split(",") if t)
            elif key == "min-cpus":
                req["min_cpus"] = int(value)
            elif key == "min-memory":
                req["min_memory_bytes"] = parse_bytes(value)
            elif key in ("os", "arch", "executor"):
                req[key] = value
            elif key == "image":
                extra["image"] = value
            elif key == "lease":
                extra["lease_s"] = float(value)
            elif key == "wait":
                extra["wait"] = float(value)
            else:
                raise ShellError(f"unknown option --{key}")
        except ValueError:
            raise ShellError(f"bad value for --{key}: {value!r}") from None
    if target == "any":
        target = None
    if req and target is not None:
        raise ShellError("give either a worker or requirements (--tag, --min-cpus, ...)")
    return target, req, extra


_TRAILING_INPUT = re.compile(
    r"^(?P<cmd>.*?[^<>&0-9\s])\s*(?<![<>&])<(?![<&(>])\s*"
    r"""(?P<path>"[^"]*"|'[^']*'|\S+)\s*$""", re.DOTALL)


def split_local_input(line: str) -> tuple[str, str | None]:
    """``CMD < FILE`` -> (CMD, FILE); (line, None) without a trailing ``< FILE``.

    Only a last ``<`` outside quotes counts (not ``<<``, ``<&``, ``2<``, ``<(``), with one
    word after it (quotes allowed: ``< 'my file'``). Whether FILE is read here or by the
    remote shell is the caller's choice (``output`` reads it here when it exists here).
    """
    import shlex

    m = _TRAILING_INPUT.match(line)
    if not m:
        return line, None
    cmd, path = m.group("cmd"), m.group("path")
    try:
        shlex.split(cmd)  # a `<` inside quotes leaves the command's quotes unbalanced
        words = shlex.split(path)
    except ValueError:
        return line, None
    if len(words) != 1:
        return line, None
    return cmd.strip(), words[0]
