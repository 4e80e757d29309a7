"""``xcloud app``: add, ls, show, rm (docs/data.md, "Applications").

client/cli.py calls ``add_app_parser`` to build the subcommands; what runs them imports
the client API inside, so ``xcloud --help`` stays quick. Uploads of binaries and image
archives draw the data progress bar on a terminal.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from client.cli_options import identity_options

if TYPE_CHECKING:
    from broker.config import Config

AddOptions = Callable[[argparse.ArgumentParser], None]


def add_app_parser(sub: Any, common: AddOptions) -> None:
    """``xcloud app ...`` under the top-level subparsers ``sub``; ``common`` adds the
    options every command takes."""
    p = sub.add_parser("app", help="applications: add, ls, show, rm",
                       description="Registered applications (docs/data.md, "
                       "\"Applications\"): per-platform binaries, a Docker image the "
                       "workers hold, a `docker save` archive, or a plain command.")
    common(p)
    _identity(p)
    asub = p.add_subparsers(dest="app_command", metavar="APP_COMMAND")

    def leaf(name: str, help: str) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = asub.add_parser(name, help=help)
        common(q)
        _identity(q)
        return q

    q = leaf("add", "register an application version")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--version", help="its version (default 1, or one above the highest)")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--binary", action="append", metavar="OS/ARCH=FILE",
                      help="an executable for one platform, e.g. linux/amd64=./prog "
                      "(repeat for each platform)")
    what.add_argument("--image", metavar="IMAGE", help="a Docker image the workers hold")
    what.add_argument("--image-archive", metavar="FILE.tar",
                      help="a `docker save` archive, stored as data for workers to load")
    what.add_argument("--command", metavar="CMD", help="a plain command line")
    who = q.add_mutually_exclusive_group()
    who.add_argument("--public", action="store_true", help="anyone may use it")
    who.add_argument("--share", metavar="P,...", help="these principals may use it")
    q.add_argument("--json", action="store_true", help="print the app as JSON")
    q.set_defaults(func=cmd_add)

    q = leaf("ls", "list your applications")
    q.add_argument("name", nargs="?", metavar="NAME", help="only this app's versions")
    q.add_argument("--owner", help="another owner's apps that you may use")
    q.add_argument("--all", action="store_true", help="admins: everyone's")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_ls)

    q = leaf("show", "one application version in detail")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--version", help="default: the latest")
    q.add_argument("--owner", help="whose app NAME is")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_show)

    q = leaf("rm", "remove a version (its files go once nothing uses them)")
    q.add_argument("name", metavar="NAME")
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="the version to remove")
    which.add_argument("--all", action="store_true", help="every version")
    q.add_argument("--owner", help="admins: whose app NAME is")
    q.set_defaults(func=cmd_rm)


def _identity(p: argparse.ArgumentParser) -> None:
    """--principal/--token, before or after the app command (SUPPRESS keeps the first)."""
    identity_options(p)


def parse_binaries(values: list[str]) -> dict[str, str]:
    """``["linux/amd64=./prog", ...]`` -> ``{"linux/amd64": "./prog"}``."""
    from client.errors import InvalidRequest

    out: dict[str, str] = {}
    for value in values:
        platform, eq, path = value.partition("=")
        if not eq or not platform or not path:
            raise InvalidRequest(f"--binary takes OS/ARCH=FILE (e.g. linux/amd64=./prog), "
                                 f"not {value!r}")
        if platform in out:
            raise InvalidRequest(f"two --binary for {platform}")
        out[platform] = path
    return out


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


# -- commands ----------------------------------------------------------------------------


def cmd_add(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid
    from client.data_cli import ProgressBar

    binaries = parse_binaries(args.binary) if args.binary else None
    share = _split(args.share)
    access = "public" if args.public else "shared" if share else "private"
    bar = ProgressBar(args.name) if ProgressBar.wanted() else None
    with Grid.connect(config) as grid:
        try:
            app = grid.apps.add(args.name, version=args.version, binaries=binaries,
                                image=args.image, image_archive=args.image_archive,
                                command=args.command, access=access, share=share or None,
                                progress=bar)
        finally:
            if bar is not None:
                bar.close()
    if args.json:
        print(json.dumps(app.to_dict(), indent=2))
    else:
        print(f"app {app.name} {app.version} ({app.kind}: {app.describe()}) registered")
    return 0


def cmd_ls(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid
    from client.table import render

    with Grid.connect(config) as grid:
        apps = grid.apps.ls(name=args.name, owner=args.owner, all=args.all)
    if args.json:
        print(json.dumps([a.to_dict() for a in apps], indent=2))
        return 0
    if not apps:
        print("no apps (register one with `xcloud app add NAME --binary linux/amd64=FILE`)")
        return 0
    print(render(["NAME", "VERSION", "KIND", "ACCESS", "OWNER", "WHAT"],
                 [[a.name, a.version, a.kind, a.access, a.owner, a.describe()]
                  for a in apps]))
    return 0


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    with Grid.connect(config) as grid:
        app = grid.apps.show(args.name, version=args.version, owner=args.owner)
    if args.json:
        print(json.dumps(app.to_dict(), indent=2))
        return 0
    print(format_app(app.to_dict()))
    return 0


def format_app(info: dict[str, Any]) -> str:
    lines: list[str] = []
    for key in ("name", "version", "owner", "kind", "image", "sha256", "size", "command",
                "access", "share", "created_at", "id"):
        value = info.get(key)
        if key == "created_at" and value:
            value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        if isinstance(value, list):
            value = ", ".join(value)
        if value not in (None, ""):
            lines.append(f"{key + ':':<12}{value}")
    for platform, binary in sorted((info.get("binaries") or {}).items()):
        lines.append(f"{'binary:':<12}{platform}  {binary['sha256']}  {binary['size']} bytes")
    if info.get("versions"):
        lines.append(f"{'versions:':<12}{', '.join(info['versions'])}")
    return "\n".join(lines)


def cmd_rm(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    with Grid.connect(config) as grid:
        removed = grid.apps.rm(args.name, version=args.version, all=args.all,
                               owner=args.owner)
    print(f"removed {removed} version(s) of {args.name}")
    return 0
