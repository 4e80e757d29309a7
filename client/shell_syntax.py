"""The shell's language: its command table and the parsing of what is typed.

Pure functions (no bus, no terminal, no prompt_toolkit), shared by the command
interpreter (:mod:`client.shell_commands`), the completer and ``xcloud run``'s option
parsing, and testable on their own.
"""

from __future__ import annotations

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
                "[--os OS] [--arch ARCH] [--executor E] [--image I] [--lease S]",
                "reserve a worker: index N of the listing, an id or name, or any match"),
    CommandSpec("myWorker", ("mine",), "myWorker", "show the worker you hold"),
    CommandSpec("output", ("run",), "output CMD",
                "run CMD on your worker and show its output live (Ctrl-C interrupts it)"),
    CommandSpec("start", ("bg",), "start CMD", "run CMD in the background; prints its id"),
    CommandSpec("ps", (), "ps", "commands started on your worker"),
    CommandSpec("logs", (), "logs ID [-f]", "output kept for a command; -f follows it"),
    CommandSpec("kill", (), "kill ID [SIGNAL]", "signal a command (default TERM)"),
    CommandSpec("release", ("releaseWorker",), "release", "give your worker back"),
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
    """Split a script on ``;`` and newlines outside quotes; backslash escapes a char.

    Only the top level splits: ``output sh -c 'a; b'`` stays one command. Quotes and
    backslashes are kept as typed, since the remote shell parses them again.
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
        elif ch in ";\n":
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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``4G``, ``512MiB``, ``1000000`` -> bytes (K/M/G/T are binary multiples)."""
    m = _SIZE.match(text)
    if not m:
        raise ShellError(f"not a size: {text!r} (e.g. 512M, 4G)")
    factor = 1024 ** " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * factor)


def reserve_args(words: list[str]) -> tuple[str | int | None, dict[str, Any], dict[str, Any]]:
    """``reserveWorker`` arguments -> (target, any-requirements, extra reserve kwargs)."""
    target: str | int | None = None
    req: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    it = iter(words)
    for word in it:
        if word.startswith("--"):
            key, eq, value = word[2:].partition("=")
            if not eq:
                try:
                    value = next(it)
                except StopIteration:
                    raise ShellError(f"--{key} needs a value") from None
            try:
                if key == "tag" or key == "tags":
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
                else:
                    raise ShellError(f"unknown option --{key}")
            except ValueError:
                raise ShellError(f"bad value for --{key}: {value!r}") from None
        elif target is None:
            target = int(word) if word.isdigit() else word
        else:
            raise ShellError(f"unexpected argument {word!r}")
    if target == "any":
        target = None
    if req and target is not None:
        raise ShellError("give either a worker or requirements (--tag, --min-cpus, ...)")
    return target, req, extra
